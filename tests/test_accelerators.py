"""Installing for accelerators: the extras map to JAX's own, and a paper-scale config on CPU
warns loudly at start-up."""

import importlib.metadata
import logging
import os
import tomllib

from absl import logging as absl_logging

from configs import cityscapes, default
from tce_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extras_are_jax_extras_of_the_same_name():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    jax_extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    for name in ("cuda12", "cuda13", "tpu"):
        assert name in jax_extras, name
        assert extras[name] == [f"jax[{name}]>=0.10.2"], extras[name]


def test_deeplab_on_cpu_warns(capsys, caplog):
    absl_logging.get_absl_handler()  # absl logs through the standard logging module
    with caplog.at_level(logging.WARNING):
        assert distributed.warn_if_cpu_for_paper_scale(cityscapes.get_config("tce"))
    printed = capsys.readouterr().out
    assert printed.startswith("WARNING: JAX runs on CPU")
    assert "pip install -e '.[cuda12]'" in printed and "'.[tpu]'" in printed
    assert "deeplabv3plus_resnet101" in printed
    assert any("JAX runs on CPU" in r.getMessage() for r in caplog.records)


def test_small_model_on_cpu_does_not_warn(capsys):
    assert not distributed.warn_if_cpu_for_paper_scale(default.get_config("tce"))
    assert not distributed.warn_if_cpu_for_paper_scale(cityscapes.get_config("runlocal"))
    assert capsys.readouterr().out == ""
