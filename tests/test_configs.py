"""Every config file loads, validates and builds; bad values fail early with the field named."""

import contextlib
import glob
import importlib.util
import os

import jax
import pytest
import run_utils
from run_utils import run_main_in_process

from tce_jax import config_lib, objectives, steps

ROOT = run_utils.ROOT
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")


def load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Variant combinations built for each config file: together they exercise every variant.
_RECIPE_VARIANTS = (
    "",
    "ce",
    "tce",
    "stochastic_tce,sampling",
    "r50,bf16,slide,tta",
    "runlocal",
    "stochastic_tce,sampling,slide,runlocal",
    "rcs,runlocal",
    "repeat_factor,runlocal",
)
TEST_VARIANTS = {
    "default.py": (
        "",
        *objectives.LOSSES,
        "tiny",
        "stochastic_tce,sampling,tiny",
        "rcs,tiny",
        "repeat_factor,tiny",
        "segformer",
        "rare,tiny",
    ),
    "cityscapes.py": (*_RECIPE_VARIANTS, "ce,segformer_b0"),
    "ade20k.py": (*_RECIPE_VARIANTS, "segformer_b1,bf16,runlocal"),
    "folder.py": (*_RECIPE_VARIANTS, "unet", "unet,ce,bf16", "segformer_b0"),
}


def variants(module):
    return list(TEST_VARIANTS[os.path.basename(module.__file__)])


def test_every_config_file_has_test_variants_and_tiny_means_the_same_run_everywhere():
    assert sorted(TEST_VARIANTS) == sorted(os.path.basename(p) for p in CONFIG_FILES)
    runs = set()
    for path in CONFIG_FILES:
        config = load_config_module(path).get_config("tiny")
        runs.add(
            (
                config.model.name,
                config.num_train_steps,
                config.checkpoint_every_steps,
                config.global_batch_size,
                config.log_every_steps,
            )
        )
    assert runs == {("unet_small", 6, 3, 8, 2)}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_validates_and_builds(path):
    module = load_config_module(path)
    for variant in variants(module):
        config = module.get_config(variant)
        config_lib.validate_config(config)
        # Building: model (shapes only), optimizer, loss, learning-rate schedule.
        model = steps.create_model(config, num_classes=5)
        h, w = config.data.crop_size
        shapes = jax.eval_shape(
            lambda m=model, h=h, w=w: m.init(
                jax.random.key(0), jax.numpy.zeros((1, h, w, 3)), train=False
            )
        )
        assert "params" in shapes
        schedule = steps.create_learning_rate_schedule(config)
        steps.create_optimizer(config, schedule)
        objectives.create_loss_fn(config)
        assert float(schedule(0)) >= 0.0


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("loss.name", "focal_typo", "config.loss.name='focal_typo' is invalid"),
        ("loss.t", float("inf"), "config.loss.t=inf is invalid"),
        ("loss.lam", 0.0, "config.loss.lam=0.0 is invalid"),
        ("optimizer.name", "adam_typo", "config.optimizer.name"),
        ("parallelism", "tpu", "config.parallelism"),
        ("global_batch_size", 0, "config.global_batch_size"),
        ("data.crop_size", (0, 4), "config.data.crop_size"),
        ("loss.focal_gamma", -1.0, "config.loss.focal_gamma=-1.0 is invalid"),
        ("loss.class_weights", "inverse_typo", "config.loss.class_weights='inverse_typo'"),
        ("data.tta_scales", (), "config.data.tta_scales"),
        ("data.tta_scales", (1.0, -0.5), "expected a non-empty tuple of positive numbers"),
        ("loss.estimator", "tilt", "config.loss.estimator='tilt' is invalid"),
        ("loss.batch_loss", "mean", "config.loss.batch_loss='mean' is invalid"),
        # Plain CE over uniformly drawn batches would be CE, not Stochastic TCE.
        ("loss.batch_loss", "ce", "'tilted' unless data.class_aware_sampling=True"),
        ("data.sampling_prior", "frequency", "config.data.sampling_prior='frequency'"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = load_config_module(DEFAULT_CONFIG).get_config("tiny")
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        config_lib.validate_config(config)


def test_batch_must_split_over_devices():
    config = load_config_module(DEFAULT_CONFIG).get_config("tiny")
    config.global_batch_size = 6
    with pytest.raises(config_lib.ConfigError, match="multiple of the number of devices"):
        config_lib.validate_layout(config, num_devices=4, num_processes=1)
    config.global_batch_size = 8
    config.data.num_shards = 3
    with pytest.raises(config_lib.ConfigError, match="data.num_shards"):
        config_lib.validate_layout(config, num_devices=4, num_processes=2)


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown config variant 'cee'"):
        load_config_module(DEFAULT_CONFIG).get_config("cee")


def run_in_process(*args):
    """The command line inside the test process (same parsing, messages and exit status; see
    `run_utils.run_main_in_process`), from the repository's root as `run_utils.run_main`."""
    with contextlib.chdir(ROOT):
        return run_main_in_process(*args)


def test_cli_rejects_a_misspelt_field_and_a_bad_value(tmp_path):
    # A new interpreter (the start-up of a real command): exit status, stderr and no
    # traceback as a shell sees them.
    typo = run_utils.run_main(
        "--config=configs/default.py:tiny",
        f"--workdir={tmp_path}",
        "--config.loss.tt=2",
        fresh=True,
    )
    assert typo.returncode == 1
    assert "Traceback" not in typo.stderr
    assert typo.stderr.strip().splitlines()[-1] == (
        "error: --config.loss.tt: config.loss has no field 'tt'; did you mean --config.loss.t?"
    )
    bad = run_in_process(
        "--config=configs/default.py:tiny", f"--workdir={tmp_path}", "--config.loss.name=mse"
    )
    assert bad.returncode != 0
    assert "config.loss.name='mse' is invalid" in bad.stderr
    assert not os.listdir(tmp_path)  # failed before writing anything


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.loss.tt=2",
            "--config.loss.tt: config.loss has no field 'tt'; did you mean --config.loss.t?",
        ),
        (
            "--config.los.t=2",
            "--config.los.t: config has no field 'los'; did you mean --config.loss?",
        ),
        (
            "--config.model.name=unet_smal",
            "config.model.name='unet_smal' is invalid: expected one of ('unet', 'unet_small', "
            "'deeplabv3plus_resnet50', 'deeplabv3plus_resnet101', 'segformer_b0', 'segformer_b1', "
            "'segformer_b2', 'segformer_b3', 'segformer_b4', 'segformer_b5') "
            "(did you mean 'unet_small'?). "
            "Fix it in the config file or with --config.model.name=...",
        ),
        (
            "--config.loss.t=abc",
            "flag --config.loss.t=abc: could not convert string to float: 'abc'",
        ),
    ],
)
def test_cli_start_up_errors_are_one_line_without_traceback(tmp_path, override, message):
    result = run_in_process("--config=configs/default.py:tiny", f"--workdir={tmp_path}", override)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not os.listdir(tmp_path)


def test_cli_unknown_variant_and_missing_config_file_are_one_line(tmp_path):
    variant = run_in_process("--config=configs/default.py:cee", f"--workdir={tmp_path}")
    missing = run_in_process("--config=configs/nonexistent.py", f"--workdir={tmp_path}")
    for result in (variant, missing):
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
    assert (
        variant.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "ValueError: Unknown config variant 'cee' (did you mean 'ce'?); use any of ce, tce, "
            "stochastic_tce, weighted_ce, focal, lovasz, recall, class_balanced, ohem, dice, "
            "sampling, rcs, repeat_factor, r50, r101, bf16, slide, tta, segformer_b0, "
            "segformer_b1, segformer_b2, segformer_b3, segformer_b4, segformer_b5, tiny, "
            "comma-separated."
        )
    )
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: --config=configs/nonexistent.py: [Errno 2] No such file or directory: "
        "'configs/nonexistent.py'"
    )


def test_cli_missing_dataset_is_reported_without_traceback(tmp_path):
    manual = tmp_path / "manual"
    result = run_in_process(
        "--config=configs/cityscapes.py:runlocal",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--config.data.manual_dir={manual}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: The manual directory {manual} does not exist." in result.stderr
    assert result.stderr.strip().endswith(
        "Set config.data.manual_dir (--config.data.manual_dir=DIR) to the directory that holds "
        "the archives."
    )
    assert not (tmp_path / "run" / "lock.json").exists()  # released on the way out
