"""Tests for tce_jax.targets: target strings, the accelerator table, compile-only devices.

Devices need the compile-only toolchains (``tce_jax[compile-tpu]``, ``tce_jax[compile-gpu]``);
without them those tests skip and the rest still run.
"""

import importlib.util

import pytest
from toolchains import compile_mesh, skip_without_toolchain

from tce_jax import targets


@pytest.mark.parametrize(
    "text, name, platform, topology, chips",
    [
        ("v5e:2x4", "v5e", "tpu", (2, 4), 8),
        ("v4:2x2x1", "v4", "tpu", (2, 2, 1), 4),
        ("v5p:2x2x1", "v5p", "tpu", (2, 2, 1), 4),
        ("v6e:2x2", "v6e", "tpu", (2, 2), 4),
        ("v5e:4x4", "v5e", "tpu", (4, 4), 16),
        ("h100:1x1x8", "h100", "cuda", (1, 1, 8), 8),
        ("A100-80GB:2x1x8", "a100-80gb", "cuda", (2, 1, 8), 16),
    ],
)
def test_parse_target(text, name, platform, topology, chips):
    target = targets.parse_target(text)
    assert target.accelerator.name == name and target.accelerator.platform == platform
    assert target.topology == topology and target.chips == chips
    assert target.name == f"{name}:{'x'.join(map(str, topology))}"


@pytest.mark.parametrize("text", ["h100:8", "h100:1x8", "x100:1x1x8", "v5e", "v5e:0x2", "v5e:2x"])
def test_parse_target_refuses_with_the_valid_forms(text):
    with pytest.raises(ValueError, match=r"use one of h100, a100-80gb, v4, v5e, v5p, v6e") as info:
        targets.parse_target(text)
    assert "\n" not in str(info.value)


def test_accelerator_table_has_facts_and_sources():
    assert set(targets.ACCELERATORS) == {"h100", "a100-80gb", "v4", "v5e", "v5p", "v6e"}
    for accelerator in targets.ACCELERATORS.values():
        assert accelerator.source.startswith("https://")
        assert accelerator.memory_bytes >= 16 * targets.GIB
        assert 0 < accelerator.peak_flops["float32"] <= accelerator.peak_flops["bfloat16"]
        assert accelerator.memory_bandwidth > 0.5e12
        assert (accelerator.gpu is not None) == (accelerator.platform == "cuda")
    h100 = targets.ACCELERATORS["h100"]
    assert h100.peak_flops["bfloat16"] == 989e12 and h100.memory_bandwidth == 3.35232e12
    assert targets.ACCELERATORS["v5e"].memory_bytes == 16 * targets.GIB


def test_gpu_target_config_describes_the_card():
    text = targets.gpu_target_config(targets.ACCELERATORS["h100"])
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert "core_count: 132" in text and "feature_extension: ACCELERATED_FEATURES" in text
    assert "device_memory_size: 84942979072" in text
    # jaxlib 0.10.2 rejects fields it does not know (newer specs have some).
    assert "collective_memory_granularity" not in text
    assert text.count("{") == text.count("}")
    with pytest.raises(ValueError, match="not a GPU"):
        targets.gpu_target_config(targets.ACCELERATORS["v5e"])


@pytest.mark.parametrize(
    "target, extra", [("v5e:2x4", "compile-tpu"), ("h100:1x1x8", "compile-gpu")]
)
def test_missing_toolchain_is_one_line_naming_the_extra(monkeypatch, target, extra):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(
        targets.ToolchainMissing, match=rf"pip install 'tce_jax\[{extra}\]'"
    ) as info:
        targets.compile_devices(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "target, count, kind",
    [
        pytest.param("v5e:2x4", 8, "TPU v5 lite", marks=skip_without_toolchain("v5e:2x4")),
        pytest.param("v4:2x2x1", 4, "TPU v4", marks=skip_without_toolchain("v4:2x2x1")),
        pytest.param(
            "h100:1x1x8", 8, "NVIDIA H100 80GB HBM3", marks=skip_without_toolchain("h100:1x1x8")
        ),
        pytest.param(
            "a100-80gb:2x1x8", 16, "NVIDIA A100-SXM4-80GB",
            marks=skip_without_toolchain("a100-80gb:2x1x8"),
        ),
    ],
)  # fmt: skip
def test_compile_mesh_has_one_device_per_chip(target, count, kind):
    mesh = compile_mesh(target)
    assert mesh.axis_names == ("data",) and mesh.devices.size == count
    assert {d.device_kind for d in mesh.devices.flat} == {kind}
