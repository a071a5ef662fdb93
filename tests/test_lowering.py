"""What the losses and the train/eval steps lower to on GPU and TPU, checked from a CPU machine.

On NVIDIA GPUs, jaxlib 0.10.2 to 0.11.0 compile a floating-point scatter-add to a
compare-and-swap loop (openxla/xla issue 46225, jax-ml/jax issue 38806): scattering every pixel
into C class bins is then hundreds to thousands of times slower than on jaxlib 0.10.1, and
few-bin scatters are slow on TPU as well. Integer scatters keep native atomics.

Each function is exported for ``cuda`` and ``tpu`` with ``jax.export`` (lowering only: no
accelerator is needed and nothing is compiled) on abstract inputs, and the StableHLO text is
searched for a ``stablehlo.scatter`` whose result is floating point and small (at most
``SMALL_FACTOR * C * C`` elements): the shape of a per-class reduction. In the train and eval
steps, large float scatters (one update per element, no contention) and integer scatters (the
confusion matrix: native atomics) are allowed; the losses alone have no float scatter at all.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tce_jax import datasets, example_transforms, losses, objectives, steps

PLATFORMS = ("cuda", "tpu")
# A per-class statistic has C elements, a confusion matrix C * C; the bins of
# weighted_cross_entropy's median-frequency image counts are B * (C + 1).
SMALL_FACTOR = 4

_SCATTER_RESULT = re.compile(
    r'"stablehlo\.scatter"\(.*?\n\s*\}\) : \([^\n]*\) -> (?P<results>[^\n]*?) '
    r"loc\((?P<loc>#loc\d+)\)",
    re.S,
)
_TENSOR = re.compile(r"tensor<(?P<dims>(?:\d+x)*)(?P<dtype>[a-z]+\d*)>")
_LOC_DEF = re.compile(r"^(#loc\d+) = loc\((.*)\)$", re.M)
_LOC_REF = re.compile(r"#loc\d+")
_SOURCE = re.compile(r'"([^"]+\.py)":(\d+)')


def _source_lines(loc: str, table: dict[str, str], depth: int = 0) -> list[str]:
    """The ``file.py:line`` positions a location alias refers to (its call stack)."""
    body = table.get(loc, "")
    found = [f"{path[path.rfind('tce_jax/'):]}:{line}" for path, line in _SOURCE.findall(body)]
    if depth < 20:
        for ref in _LOC_REF.findall(body):
            found += _source_lines(ref, table, depth + 1)
    return found


def small_float_scatters(
    module_text: str, num_classes: int, max_elements: float | None = None
) -> list[str]:
    """The ``stablehlo.scatter`` ops with a floating-point result of at most ``max_elements``
    (default ``SMALL_FACTOR * C * C``) elements, each as its first and last line of text and
    the ``tce_jax`` source lines it comes from."""
    if max_elements is None:
        max_elements = SMALL_FACTOR * num_classes**2
    table = dict(_LOC_DEF.findall(module_text))
    found = []
    for match in _SCATTER_RESULT.finditer(module_text):
        for tensor in _TENSOR.finditer(match.group("results")):
            dims = [int(d) for d in tensor.group("dims").split("x") if d]
            is_float = tensor.group("dtype").startswith(("f", "bf"))
            if is_float and int(np.prod(dims)) <= max_elements:
                lines = match.group(0).splitlines()
                stack = [
                    s for s in _source_lines(match.group("loc"), table) if s.startswith("tce_jax")
                ]
                found.append(
                    f"{lines[0].strip()} ... {lines[-1].strip()}) from {' <- '.join(stack)}"
                )
                break
    return found


def assert_no_small_float_scatter(fn, args, num_classes: int, max_elements=None) -> None:
    problems = []
    for platform in PLATFORMS:
        exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
        problems += [
            f"[{platform}] {op}"
            for op in small_float_scatters(exported.mlir_module(), num_classes, max_elements)
        ]
    assert not problems, "float scatter into a few bins:\n" + "\n".join(problems)


def test_detector_finds_a_segment_sum_and_allows_integer_scatters():
    """The check itself: a float segment_sum is reported, an integer one is not."""
    values = jax.ShapeDtypeStruct((1000,), jnp.float32)
    segments = jax.ShapeDtypeStruct((1000,), jnp.int32)

    def float_sum(v, s):
        return jax.ops.segment_sum(v, s, num_segments=19)

    def int_sum(v, s):
        return jax.ops.segment_sum(jnp.ones_like(s), s, num_segments=19)

    text = jax.export.export(jax.jit(float_sum), platforms=["cuda"])(values, segments)
    found = small_float_scatters(text.mlir_module(), 19)
    assert len(found) == 1 and "tensor<19xf32>" in found[0], found
    text = jax.export.export(jax.jit(int_sum), platforms=["cuda"])(values, segments)
    assert small_float_scatters(text.mlir_module(), 19) == []
    with pytest.raises(AssertionError, match="float scatter into a few bins"):
        assert_no_small_float_scatter(float_sum, (values, segments), 19)


# ----------------------------------------------------------------------------------------------
# The losses: value and gradient w.r.t. the logits.

SHAPE = (2, 16, 24)  # [B, H, W]; the class count is a parameter
NUM_CLASSES = 19


def _tce(z, y, **kwargs):
    return losses.tilted_ce(z, y, **kwargs)


def _stochastic(z, y, **kwargs):
    loss, _, _ = losses.stochastic_tce(z, y, losses.stochastic_tce_init(z.shape[-1]), **kwargs)
    return loss


def _statistics_sum(z, y, **kwargs):
    stats = losses.class_statistics(z, y, **kwargs)
    return jnp.sum(losses.class_losses(stats, tau=kwargs.get("tau", 0.0)))


LOSS_CASES = {
    "tilted_ce": functools.partial(_tce, t=2.0),
    "tilted_ce_tau": functools.partial(_tce, t=-1.0, tau=0.5, class_weighting="uniform"),
    "cross_entropy": losses.cross_entropy,
    "stochastic_tce": functools.partial(_stochastic, t=1.0, lam=0.1),
    "stochastic_tce_tau": functools.partial(_stochastic, t=1.0, lam=0.1, tau=1.0),
    "weighted_ce_inverse": functools.partial(
        losses.weighted_cross_entropy, class_weights="inverse_frequency"
    ),
    "weighted_ce_median": functools.partial(
        losses.weighted_cross_entropy, class_weights="median_frequency"
    ),
    "focal": losses.softmax_focal_loss,
    "lovasz": losses.lovasz_softmax,
    "recall": losses.recall_cross_entropy,
    "class_balanced": functools.partial(
        losses.class_balanced_cross_entropy, class_count=np.arange(NUM_CLASSES) + 1
    ),
    "ohem": functools.partial(losses.ohem_cross_entropy, min_kept=50),
    "dice": losses.dice_loss,
    "class_statistics": _statistics_sum,
    "class_statistics_tau": functools.partial(_statistics_sum, tau=-0.5),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_value_and_grad_has_no_float_scatter(name, dtype):
    """No float scatter of any size: not even the [pixels, C] gradient of a label gather."""
    logits = jax.ShapeDtypeStruct(SHAPE + (NUM_CLASSES,), dtype)
    labels = jax.ShapeDtypeStruct(SHAPE, jnp.int32)
    fn = jax.value_and_grad(LOSS_CASES[name])
    assert_no_small_float_scatter(fn, (logits, labels), NUM_CLASSES, max_elements=np.inf)


def test_parallel_loss_has_no_float_scatter():
    """Under shard_map with ``axis_name`` (the pmap/shard_map form of the statistics)."""
    mesh = jax.make_mesh((2,), ("batch",))
    spec = jax.sharding.PartitionSpec("batch")
    sharding = jax.sharding.NamedSharding(mesh, spec)

    def per_device(z, y):
        return jax.value_and_grad(
            functools.partial(losses.tilted_ce, t=1.0, tau=0.5, axis_name="batch")
        )(z, y)

    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(spec, spec),
        out_specs=(jax.sharding.PartitionSpec(), spec),
        check_vma=False,
    )
    logits = jax.ShapeDtypeStruct(SHAPE + (NUM_CLASSES,), jnp.float32, sharding=sharding)
    labels = jax.ShapeDtypeStruct(SHAPE, jnp.int32, sharding=sharding)
    assert_no_small_float_scatter(fn, (logits, labels), NUM_CLASSES, max_elements=np.inf)


# ----------------------------------------------------------------------------------------------
# The train and eval steps of the tiny config (with `segformer`: SegFormer-B0), built as
# tce_jax.train builds them.


def _tiny(variant: str):
    config = default.get_config(f"{variant},tiny")
    spec = datasets.get_dataset_spec(config.data.name)
    return config, spec


def _abstract_state(config, model, tx, num_classes):
    init = functools.partial(steps.init_state, config, model, tx, num_classes)
    return jax.eval_shape(init, jax.random.key(0))


@pytest.mark.parametrize(
    "variant, accum, photometric",
    [
        ("tce", 1, False),
        ("stochastic_tce", 1, False),
        ("weighted_ce", 1, False),
        ("tce", 2, False),
        ("tce", 1, True),  # the photometric jitter applied in the step
        ("tce,segformer", 1, False),
    ],
)
def test_train_step_has_no_float_scatter(variant, accum, photometric):
    config, spec = _tiny(variant)
    if variant == "weighted_ce":
        config.loss.class_weights = "median_frequency"
    model = steps.create_model(config, spec.num_classes)
    tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config))
    accumulation = {}
    if accum > 1:  # micro-batches, combined by the loss's decomposition
        accumulation = dict(
            grad_accum_steps=accum, decomposition=objectives.create_decomposition(config)
        )
    step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        loss_fn=objectives.create_loss_fn(config),
        **accumulation,
    )
    h, w = config.data.crop_size
    batch = {  # uint8 images, as the input pipeline delivers them
        "image": jax.ShapeDtypeStruct((config.global_batch_size, h, w, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((config.global_batch_size, h, w), jnp.int32),
    }
    if photometric:  # the jitter drawn by the input pipeline, applied on the device
        size = (config.global_batch_size, example_transforms.PHOTOMETRIC_SIZE)
        batch["photometric"] = jax.ShapeDtypeStruct(size, jnp.float32)
    state = _abstract_state(config, model, tx, spec.num_classes)
    assert_no_small_float_scatter(step, (state, batch), spec.num_classes)


@pytest.mark.parametrize(
    "variant, resize", [("tce", False), ("tce", True), ("tce,segformer", True)]
)
def test_eval_step_has_no_float_scatter(variant, resize):
    config, spec = _tiny(variant)
    model = steps.create_model(config, spec.num_classes)
    tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config))
    step = functools.partial(
        steps.eval_step,
        model=model,
        num_classes=spec.num_classes,
        mode=config.data.eval_mode,
        window=tuple(config.data.eval_window),
        stride=tuple(config.data.eval_stride),
        resize=resize,
        ignore_index=spec.ignore_index,
    )
    b = config.data.eval_batch_size
    h, w = config.data.crop_size
    scale = 2 if resize else 1  # labels at a higher resolution than the canvas
    batch = {
        "image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((b, scale * h, scale * w), jnp.int32),
        "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
        "image_size": jax.ShapeDtypeStruct((b, 2), jnp.int32),
        "label_size": jax.ShapeDtypeStruct((b, 2), jnp.int32),
    }
    state = _abstract_state(config, model, tx, spec.num_classes)
    assert_no_small_float_scatter(step, (state, batch), spec.num_classes)
