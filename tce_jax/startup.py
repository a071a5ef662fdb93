"""The start of every process that trains: the command line (`tce_jax.main`), a sweep's runs
(`experiments/train_run.py`), the demo and the train-step benchmark all call `start`."""

import os

import ml_collections
from absl import logging


def start(config: ml_collections.ConfigDict, *, quiet_logs: bool = True) -> None:
    """Checks `config` and readies the process: call once, before any other JAX call.

    * quiet logs: TensorFlow's C++ logs off, absl at WARNING (Orbax and TFDS log every step at
      INFO; the terminal is for the progress lines) unless `quiet_logs=False`;
    * `config_lib.validate_config`, the config's one check (the trainer takes it as checked): a
      bad value fails before any data is read or compiled;
    * `jax.distributed` when the config or the launcher asks (`tce_jax.distributed`);
    * TensorFlow kept off the accelerators (it only feeds data; JAX owns the devices);
    * the device topology logged, and a warning for a paper-scale model on CPU.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if quiet_logs:
        logging.set_verbosity(logging.WARNING)
    from tce_jax import config_lib, distributed

    config_lib.validate_config(config)
    distributed.initialize(config)

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    distributed.log_topology()
    distributed.warn_if_cpu_for_paper_scale(config)
