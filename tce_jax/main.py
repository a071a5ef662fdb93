r"""Command line: train and evaluate from an ml_collections config file.

    python -m tce_jax.main --config=configs/default.py:tce --workdir=workdirs/tce
    python -m tce_jax.main --config=configs/default.py --workdir=workdirs/tce \
        --mode=evaluate --checkpoint=best
    python -m tce_jax.main --config=configs/default.py --workdir=workdirs/tce \
        --mode=predict --predict_split=validation
    python -m tce_jax.main --config=configs/default.py --workdir=... --config.loss.t=2.0

Configs are locked: a misspelt `--config.x=y` fails at once. Invalid values fail before any
data is read or anything compiled.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:variants]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict"],
    "Train (and resume), only evaluate, or write predictions (PNG files; see tce_jax.predict).",
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if not FLAGS["verbosity"].present:
        # Orbax and TFDS log every step at INFO; keep the terminal for the progress lines.
        logging.set_verbosity(logging.WARNING)
    # Validate before JAX or TensorFlow start: a bad value should cost nothing.
    from tce_jax import config_lib, distributed

    config_lib.validate_config(config)
    distributed.initialize(config)  # before any other JAX call

    import jax
    import tensorflow as tf

    # TensorFlow only feeds data: keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    distributed.log_topology()

    from tce_jax import train

    workdir = os.path.abspath(FLAGS.workdir)
    if FLAGS.mode == "train":
        train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "predict":
        from tce_jax import predict

        predict.predict(
            config,
            workdir,
            checkpoint=FLAGS.checkpoint,
            split=FLAGS.predict_split,
            images_dir=FLAGS.predict_images,
            output_dir=FLAGS.predict_dir,
        )
    else:
        train.evaluate(config, workdir, checkpoint=FLAGS.checkpoint)
    distributed.barrier("end of run")
    logging.info("Done (process %d).", jax.process_index())


if __name__ == "__main__":
    app.run(main)
