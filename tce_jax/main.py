r"""Command line: train and evaluate from an ml_collections config file.

    python -m tce_jax.main --config=configs/default.py:tce --workdir=workdirs/tce
    python -m tce_jax.main --config=configs/default.py --workdir=workdirs/tce \
        --mode=evaluate --checkpoint=best
    python -m tce_jax.main --config=configs/default.py --workdir=workdirs/tce \
        --mode=predict --predict_split=validation
    python -m tce_jax.main --config=configs/default.py --workdir=... --config.loss.t=2.0
    python -m tce_jax.main --config=configs/cityscapes.py:tce --mode=compile --target=v5e:2x4

Configs are locked: a misspelt `--config.x=y` fails at once. Invalid values fail before any
data is read or anything compiled. Errors the user can fix (config, data, workdir) end the
process with exit status 1 and one message on stderr, without a traceback.

The workdir is a local path or `gs://bucket/path`. One process at a time may use it (a second
is refused); resuming a checkpoint with a config of another experiment is refused unless
`--allow_config_change` (see `tce_jax.workdir`).

`--mode=compile --target=T` compiles the run's steps for accelerators this machine need not have
(`tce_jax.compile_mode`): no workdir, no data.
"""

import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:variants]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports (or gs://...).")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict", "compile"],
    "Train (and resume), only evaluate, write predictions (PNG files; see tce_jax.predict), or "
    "compile the steps for --target (see tce_jax.compile_mode).",
)
flags.DEFINE_string(
    "target",
    None,
    "--mode=compile: the accelerators, e.g. v5e:2x4, v4:2x2x1 (TPU chips per axis) or h100:1x1x8, "
    "a100-80gb:2x1x8 (GPU partitions x hosts x GPUs per host); see tce_jax.targets.",
)
flags.DEFINE_string(
    "checkpoint", "best", "For --mode=evaluate/predict: best, latest or a step number."
)
flags.DEFINE_string(
    "predict_split",
    None,
    "--mode=predict: a split of the dataset (default config.data.eval_split).",
)
flags.DEFINE_string("predict_images", None, "--mode=predict: a folder of .png/.jpg images instead.")
flags.DEFINE_string(
    "predict_dir",
    None,
    "--mode=predict: output folder (default WORKDIR/predictions/<split|folder>).",
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir even though experiment fields of its config.json differ (the change is "
    "recorded in config_history.jsonl).",
)
flags.mark_flags_as_required(["config"])


def fail(message) -> None:
    """Ends the process with `message` as the last line of stderr (no traceback)."""
    sys.stderr.flush()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def is_user_error(error: BaseException) -> bool:
    """Whether `error`'s message says what to fix: then it is printed alone, no traceback."""
    from tce_jax import config_lib, workdir

    kinds = [config_lib.ConfigError, workdir.WorkdirError]
    # Only raised once the datasets are imported (which imports TensorFlow: not for this).
    archives = sys.modules.get("tce_jax.datasets.archives")
    if archives is not None:
        kinds.append(archives.DatasetNotFoundError)
    for module, kind in (
        ("tce_jax.predict", "PredictInputError"),
        ("tce_jax.compile_mode", "CompileModeError"),
        ("tce_jax.targets", "ToolchainMissing"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], kind))
    return isinstance(error, tuple(kinds))


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config in `argv` (either `--config=X` or `--config X`)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """A one-line message for the first `--config.FIELD=...` naming no field, or None."""
    from tce_jax import config_lib

    argument = _config_argument(argv)
    if argument is None:
        return None
    config = FLAGS["config"].parser.parse(argument)
    for arg in argv:
        if arg.startswith(("--config.", "--noconfig.")):
            field = arg.split("=", 1)[0].split(".", 1)[1]
            message = config_lib.unknown_field_message(config, field)
            if message:
                return message
    return None


def _one_line(message: str) -> str:
    """A flag error on one line; a traceback in it (ml_collections quotes the config file's)
    is cut down to its last line, the exception."""
    head, traceback_marker, rest = message.partition("Traceback (most recent call last):")
    if traceback_marker:
        message = head + rest.strip().splitlines()[-1]
    return " ".join(message.split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line (see `fail`)."""
    try:
        rest = FLAGS(argv)
        if not isinstance(FLAGS.config, ml_collections.ConfigDict):
            # ml_collections defers a config file's load error to the first use of the config.
            FLAGS.config.get_type("seed")
        return rest
    except OSError as e:
        fail(f"--config={_config_argument(argv)}: {str(e).strip().splitlines()[-1].strip()}")
    except flags.Error as e:
        fail(_one_line(str(e)))
    except (AttributeError, KeyError, ValueError) as e:
        # ml_collections raises these while parsing --config: an override naming no field
        # (AttributeError/KeyError), or the config file rejecting its variants (ValueError).
        try:
            message = _unknown_override(argv)
        except (AttributeError, KeyError, ValueError):
            message = None
        fail(message or str(e).strip("\"'"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        run(FLAGS.config)
    except Exception as e:
        if not is_user_error(e):
            raise
        fail(e)


def run(config) -> None:
    from tce_jax import startup, workdir

    if FLAGS.mode == "compile":
        return compile_only(config)
    if FLAGS.workdir is None:
        fail("Flag --workdir must have a value other than None (every mode but compile).")

    # Both checks (the config's in `start`) before any device is set up: a bad value or
    # workdir should cost nothing.
    path = workdir.resolve(FLAGS.workdir)
    startup.start(config, quiet_logs=not FLAGS["verbosity"].present)

    import jax

    from tce_jax import checkpointing, distributed, train

    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, path, allow_config_change=FLAGS.allow_config_change)
        elif FLAGS.mode == "predict":
            from tce_jax import predict

            predict.predict(
                config,
                path,
                checkpoint=FLAGS.checkpoint,
                split=FLAGS.predict_split,
                images_dir=FLAGS.predict_images,
                output_dir=FLAGS.predict_dir,
            )
        else:
            train.evaluate(config, path, checkpoint=FLAGS.checkpoint)
    except checkpointing.RunStopped as e:
        # Preemption, divergence, a corrupt checkpoint: the message says what to do; exit codes
        # 130 / 143 after SIGINT / SIGTERM (as a shell reports them), 1 otherwise.
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    distributed.barrier("end of run")
    logging.info("Done (process %d).", jax.process_index())


def compile_only(config) -> None:
    """`--mode=compile`: the config's checks, then `compile_mode.run`. No `startup.start`: this
    process starts no distributed run and no accelerator."""
    import os

    from tce_jax import compile_mode, config_lib

    if FLAGS.target is None:
        fail("--mode=compile needs --target, e.g. --target=h100:1x1x8 or --target=v5e:2x4.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config_lib.validate_config(config)
    compile_mode.run(config, FLAGS.target)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
