"""Accelerators to compile for without having one: their facts, and compile-only devices.

A target string names an accelerator and a topology:

* TPU: ``v4:2x2x1``, ``v5e:2x4``, ``v5e:4x4``, ``v5p:2x2x1``, ``v6e:2x2`` (Cloud TPU topology
  names: chips along each axis). Needs ``libtpu`` (``pip install 'tce_jax[compile-tpu]'``).
* GPU: ``h100:1x1x8``, ``a100-80gb:2x1x8`` (the card, then partitions x hosts x GPUs per host).
  Needs JAX's CUDA plugin and ``ptxas`` (``pip install 'tce_jax[compile-gpu]'``), no GPU and
  no CUDA runtime; JAX must run on the CPU (:func:`compile_devices` sets ``jax_platforms=cpu``
  when JAX has not started yet), otherwise the plugin fails at start-up on ``cuInit``.

:func:`compile_devices` / :func:`compile_mesh` give XLA's compile-only devices for a target
(``jax.jit(..., in_shardings=...).lower(...).compile()`` on them works; running does not).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import shutil
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from tce_jax.parallel import MESH_AXIS

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The fields of XLA's ``GpuTargetConfigProto`` that differ between the cards we list
    (the rest are the same for every NVIDIA GPU since Volta); see :func:`gpu_target_config`."""

    name: str  # the device kind JAX reports
    compute_capability: tuple[int, int]
    feature_extension: str  # "ACCELERATED_FEATURES" compiles for sm_90a
    core_count: int  # streaming multiprocessors
    fpus_per_core: int
    clock_rate_ghz: float
    l2_cache_size: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One accelerator chip (TPU) or card (GPU).

    ``peak_flops`` maps a compute dtype to the dense matmul rate XLA's default precision can
    reach: on GPUs float32 matmuls and convolutions run as TF32, on TPUs as one bfloat16 pass.
    """

    name: str  # as written in target strings
    platform: str  # "tpu" or "cuda"
    memory_bytes: int
    peak_flops: Mapping[str, float]
    memory_bandwidth: float  # bytes per second
    source: str
    gpu: GpuSpec | None = None
    megacore: bool = False  # TPU: one JAX device per chip, both TensorCores
    chips_per_host: int = 4  # TPU: chips one host drives (a larger slice spans hosts)

    @property
    def extra(self) -> str:
        """The ``tce_jax`` extra that installs the compiler for this accelerator."""
        return "compile-tpu" if self.platform == "tpu" else "compile-gpu"


def _tpu(name, memory_gib, bf16_tflops, bandwidth_gbps, **kwargs) -> Accelerator:
    flops = bf16_tflops * 1e12
    return Accelerator(
        name, "tpu", memory_gib * GIB, {"bfloat16": flops, "float32": flops},
        bandwidth_gbps * 1e9, f"https://cloud.google.com/tpu/docs/{name}", **kwargs,
    )  # fmt: skip


# GPU memory, bandwidth and GpuSpec: XLA's published target descriptions
# (github.com/openxla/xla, xla/backends/gpu/target_config/specs/{h100_sxm,a100_sxm_80}.txtpb);
# peak rates (dense, without sparsity): NVIDIA's H100 and A100 datasheets.
# TPU facts: Cloud TPU's system architecture page of each generation (per chip).
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "h100", "cuda",
            memory_bytes=84_942_979_072,
            peak_flops={"bfloat16": 989e12, "float32": 494e12},
            memory_bandwidth=3.35232e12,
            source="https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM 80GB); "
            "openxla/xla xla/backends/gpu/target_config/specs/h100_sxm.txtpb",
            gpu=GpuSpec(
                "NVIDIA H100 80GB HBM3", (9, 0), "ACCELERATED_FEATURES", core_count=132,
                fpus_per_core=128, clock_rate_ghz=1.98, l2_cache_size=52_428_800,
                shared_memory_per_core=233_472, shared_memory_per_block_optin=232_448,
            ),
        ),
        Accelerator(
            "a100-80gb", "cuda",
            memory_bytes=85_100_068_864,
            peak_flops={"bfloat16": 312e12, "float32": 156e12},
            memory_bandwidth=2.03904e12,
            source="https://www.nvidia.com/en-us/data-center/a100/ (A100 SXM4 80GB); "
            "openxla/xla xla/backends/gpu/target_config/specs/a100_sxm_80.txtpb",
            gpu=GpuSpec(
                "NVIDIA A100-SXM4-80GB", (8, 0), "NONE", core_count=108, fpus_per_core=64,
                clock_rate_ghz=1.41, l2_cache_size=41_943_040, shared_memory_per_core=167_936,
                shared_memory_per_block_optin=166_912,
            ),
        ),
        _tpu("v4", 32, 275, 1200, megacore=True),
        _tpu("v5e", 16, 197, 819, chips_per_host=8),
        _tpu("v5p", 95, 459, 2765, megacore=True),
        _tpu("v6e", 32, 918, 1640, chips_per_host=8),
    )
}  # fmt: skip

# The cuDNN that `jax[cuda12]==0.10.2` installs at least: XLA picks cuDNN fusions by version.
_CUDNN_VERSION = (9, 8, 0)


def gpu_target_config(accelerator: Accelerator) -> str:
    """The card as a ``GpuTargetConfigProto`` in text form, for
    ``topologies.get_topology_desc(platform="cuda", target_config=...)``."""
    spec = accelerator.gpu
    if spec is None:
        raise ValueError(f"{accelerator.name} is not a GPU.")
    major, minor = spec.compute_capability
    cudnn_major, cudnn_minor, cudnn_patch = _CUDNN_VERSION
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {spec.core_count}
  fpus_per_core: {spec.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(accelerator.memory_bandwidth)}
  l2_cache_size: {spec.l2_cache_size}
  clock_rate_ghz: {spec.clock_rate_ghz}
  device_memory_size: {accelerator.memory_bytes}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
    feature_extension: {spec.feature_extension}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn_major}
  minor: {cudnn_minor}
  patch: {cudnn_patch}
}}
device_description_str: "{spec.name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target string: ``accelerator`` and ``topology`` (chips per axis for a TPU;
    partitions x hosts x GPUs per host for a GPU)."""

    accelerator: Accelerator
    topology: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.accelerator.name}:{'x'.join(map(str, self.topology))}"

    @property
    def chips(self) -> int:
        """Chips (TPU) or cards (GPU) in the whole slice or cluster."""
        return math.prod(self.topology)


class ToolchainMissing(RuntimeError):
    """The compiler for a target is not installed (the message names the extra)."""


def parse_target(text: str) -> Target:
    """``"v5e:2x4"`` or ``"h100:1x1x8"`` as a :class:`Target`; ValueError (one line naming
    the valid forms) otherwise."""
    name, _, topology = (part.strip() for part in text.partition(":"))
    accelerator = ACCELERATORS.get(name.lower())
    dims = topology.split("x")
    allowed = (3,) if accelerator is not None and accelerator.platform == "cuda" else (2, 3)
    if (
        accelerator is None
        or len(dims) not in allowed
        or not all(re.fullmatch(r"[1-9]\d*", d) for d in dims)
    ):
        raise ValueError(
            f"Unknown target {text!r}: use one of {', '.join(ACCELERATORS)} with a topology, "
            "e.g. v5e:2x4, v4:2x2x1 (TPU chips per axis) or h100:1x1x8 (GPU partitions x hosts "
            "x GPUs per host)."
        )
    return Target(accelerator, tuple(int(d) for d in dims))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_toolchain(target: Target) -> None:
    """Raise :class:`ToolchainMissing` when the compiler for ``target`` is not installed."""
    accelerator = target.accelerator
    if accelerator.platform == "tpu":
        missing, what = not _installed("libtpu"), "libtpu"
    else:
        ptxas = _installed("nvidia.cuda_nvcc") or shutil.which("ptxas")
        missing = not (_installed("jax_plugins.xla_cuda12") and ptxas)
        what = "JAX's CUDA plugin and ptxas"
    if missing:
        raise ToolchainMissing(
            f"Compiling for {target.name} needs {what}: pip install 'tce_jax[{accelerator.extra}]'"
        )


def compile_devices(target: str | Target) -> list:
    """XLA's compile-only devices of ``target`` (one per GPU, per TPU chip)."""
    target = parse_target(target) if isinstance(target, str) else target
    check_toolchain(target)
    accelerator = target.accelerator
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        # JAX itself on the CPU: only the target's compiler runs (an installed CUDA plugin would
        # look for a GPU at start-up, and fail without one, even for a TPU target).
        jax.config.update("jax_platforms", "cpu")
    if accelerator.platform == "tpu":
        options = {"chip_config_name": "megacore"} if accelerator.megacore else {}
        if target.chips <= accelerator.chips_per_host:  # one host drives the whole slice
            options["chips_per_host_bounds"] = (*target.topology, 1)[:3]
        topology = topologies.get_topology_desc(
            topology_name=target.name, platform="tpu", **options
        )
        return list(topology.devices)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda",
            topology="x".join(map(str, target.topology)),
            target_config=gpu_target_config(accelerator),
        )
    except NotImplementedError as error:
        raise RuntimeError(
            f"Cannot compile for {target.name}: JAX started without JAX_PLATFORMS=cpu, so its "
            "CUDA plugin failed to start; set JAX_PLATFORMS=cpu before starting Python."
        ) from error
    return list(topology.devices)


def compile_mesh(target: str | Target) -> Mesh:
    """A one-axis mesh (axis ``MESH_AXIS``, as the trainer's) of ``target``'s devices."""
    return Mesh(np.asarray(compile_devices(target)), (MESH_AXIS,))
