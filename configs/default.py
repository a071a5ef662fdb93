"""Default config: the embedded street-scenes dataset, a small UNet, tilted CE.

Variants are chosen after a colon, comma-separated, e.g.::

    python -m tce_jax.main --config=configs/default.py:ce --workdir=/tmp/ce
    python -m tce_jax.main --config=configs/default.py:stochastic_tce,tiny --workdir=/tmp/s

* `ce`, `tce`, `stochastic_tce`: the loss (default `tce`);
* `tiny`: a few steps on small crops for tests and smoke runs.

Any field can be overridden on the command line: `--config.loss.t=2.0`.
"""

from tce_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.apply_variants(config_lib.get_base_config(), arg)
