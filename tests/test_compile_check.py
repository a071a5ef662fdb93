"""Tests for tce_jax.compile_check: the HLO census, the report's arithmetic, and (with the
compile-only toolchains, else skipped) reports of a small step compiled for a TPU and a GPU."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from toolchains import compile_mesh, skip_without_toolchain

from tce_jax import compile_check, targets

# Optimized-HLO text as XLA prints it (operands by name only; async collectives in pairs).
HLO = """\
HloModule jit_step, entry_computation_layout={(f32[4096]{0})->f32[19]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_pool (param_0: f32[32,64], param_1: s32[8192,2], param_2: f32[8192]) -> f32[32,64] {
  %param_0 = f32[32,64]{1,0} parameter(0)
  %param_1 = s32[8192,2]{1,0} parameter(1)
  %param_2 = f32[8192]{0} parameter(2)
  ROOT %scatter.2 = f32[32,64]{1,0} scatter(%param_0, %param_1, %param_2), to_apply=%add
}

ENTRY %main (p0: f32[4096], p1: s32[4096,1], p2: bf16[64,128]) -> f32[19] {
  %p0 = f32[4096]{0} parameter(0), metadata={op_name="x"}
  %p1 = s32[4096,1]{1,0} parameter(1)
  %p2 = bf16[64,128]{1,0} parameter(2)
  %zeros = f32[19]{0} constant({...})
  %izeros = s32[19]{0} constant({...})
  %zero = bf16[] constant(0)
  %pooled = bf16[32,64]{1,0} reduce-window(%p2, %zero), window={size=2x2 stride=2x2}
  %ones = s32[4096]{0} constant({...})
  %bins = f32[19]{0} scatter(%zeros, %p1, %p0), update_window_dims={}, to_apply=%add
  %counts = s32[19]{0} scatter(%izeros, %p1, %ones), update_window_dims={}, to_apply=%add
  %all-reduce.1 = (f32[19]{0}, s32[19]{0}) all-reduce(%bins, %counts), channel_id=1, to_apply=%add
  %ags = (bf16[64,128]{1,0}, bf16[512,128]{1,0}) all-gather-start(%p2), dimensions={0}
  %agd = bf16[512,128]{1,0} all-gather-done(%ags)
  %pool = bf16[64,128]{1,0} select-and-scatter(%p2, %pooled, %zero), window={size=2x2 stride=2x2}
  %rs = bf16[8,128]{1,0} reduce-scatter(%p2), dimensions={0}, to_apply=%add
  %cp-start = (bf16[64,128]{1,0}, bf16[64,128]{1,0}, u32[], u32[]) collective-permute-start(%p2)
  %cp-done = bf16[64,128]{1,0} collective-permute-done(%cp-start)
  ROOT %gte = f32[19]{0} get-tuple-element(%all-reduce.1), index=0
}
"""


def test_census_counts_collectives_once_with_their_operand_bytes():
    census = compile_check.hlo_census(HLO)
    by_kind = {c.kind: (c.count, c.operand_bytes) for c in census.collectives}
    assert by_kind == {
        "all-reduce": (1, 19 * 4 + 19 * 4),
        "all-gather": (1, 64 * 128 * 2),
        "reduce-scatter": (1, 64 * 128 * 2),
        "collective-permute": (1, 64 * 128 * 2),
    }


def test_census_flags_float_scatters_into_few_elements_only():
    census = compile_check.hlo_census(HLO)
    scatters = {s.name: s for s in census.float_scatters}
    assert set(scatters) == {"bins", "scatter.2", "pool"}  # int32 counts are no float scatter
    assert scatters["bins"].updates_per_element == pytest.approx(4096 / 19)
    assert scatters["bins"].contended
    assert scatters["scatter.2"].updates_per_element == 4  # a max-pool gradient's shape
    assert not scatters["scatter.2"].contended
    assert scatters["pool"].updates_per_element == 0.25 and not scatters["pool"].contended
    [error] = census.errors
    assert error.startswith("floating-point scatter bins into f32[19]{0}: 216 updates")


def test_census_of_a_cpu_compiled_histogram():
    def histogram(values, labels):
        return jnp.zeros((19,), jnp.float32).at[labels].add(values)

    # As XLA compiles it by default (the test process compiles with the elemental emitters,
    # which expand scatters into loops: conftest.py).
    compiled = (
        jax.jit(histogram)
        .lower(jax.ShapeDtypeStruct((8192,), jnp.float32), jax.ShapeDtypeStruct((8192,), jnp.int32))
        .compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
    )
    census = compile_check.hlo_census(compiled.as_text())
    assert census.collectives == ()
    assert [s.updates_per_element for s in census.float_scatters] == [pytest.approx(8192 / 19)]
    assert len(census.errors) == 1


def make_report(**overrides):
    fields = dict(
        name="train step",
        target=targets.parse_target("v5e:2x4"),
        devices=8,
        argument_bytes=2 * targets.GIB,
        output_bytes=2 * targets.GIB,
        temp_bytes=3 * targets.GIB,
        alias_bytes=2 * targets.GIB,
        flops=1.97e12,
        flops_source="optimized program",
        compute_dtype="bfloat16",
        census=compile_check.hlo_census(HLO),
        compile_seconds=12.0,
    )
    return compile_check.CompileReport(**{**fields, **overrides})


def test_report_memory_and_step_time_bound():
    report = make_report()
    assert report.peak_bytes == 5 * targets.GIB and report.memory_bytes == 16 * targets.GIB
    assert report.fits
    assert report.step_seconds_bound == pytest.approx(1.97e12 / 197e12)  # compute-bound
    traffic = make_report(flops=0.0).step_seconds_bound
    assert traffic == pytest.approx(4 * targets.GIB / 819e9)  # arguments + outputs once
    assert not make_report(temp_bytes=15 * targets.GIB).fits
    summary = make_report(temp_bytes=15 * targets.GIB).summary()
    assert "17.00 GiB of 16.00 GiB (DOES NOT FIT" in summary
    assert "all-reduce x1" in summary and "ERROR: floating-point scatter bins" in summary


def sgd_step(w, x, labels):
    """A linear classifier's SGD step with a histogram of its labels (a small float scatter)."""

    def loss(w):
        logits = x @ w
        picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    counts = jnp.zeros((w.shape[1],), jnp.float32).at[labels].add(1.0)
    return w - 0.1 * jax.grad(loss)(w), counts


@pytest.mark.parametrize(
    "target, flops_source",
    [
        pytest.param("v5e:2x4", "optimized program", marks=skip_without_toolchain("v5e:2x4")),
        pytest.param("h100:1x1x2", "unoptimized", marks=skip_without_toolchain("h100:1x1x2")),
    ],
)
def test_compile_report_on_a_target(target, flops_source):
    mesh = compile_mesh(target)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    jitted = jax.jit(
        sgd_step,
        in_shardings=(replicated, sharded, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    n = mesh.devices.size
    args = (
        jax.ShapeDtypeStruct((256, 19), jnp.float32, sharding=replicated),
        jax.ShapeDtypeStruct((n * 4096, 256), jnp.float32, sharding=sharded),
        jax.ShapeDtypeStruct((n * 4096,), jnp.int32, sharding=sharded),
    )
    report = compile_check.compile_report(
        jitted, args, targets.parse_target(target), compute_dtype="float32"
    )
    assert report.devices == n
    # Per device: the weights and this device's rows of the batch (TPUs pad small dimensions
    # to their tiles: a little more).
    weights, rows = 256 * 19 * 4, 4096 * 256 * 4 + 4096 * 4
    assert weights + rows <= report.argument_bytes <= 1.05 * (weights + rows)
    assert weights <= report.alias_bytes <= 2 * weights and report.fits
    # The forward and backward matmuls of this device's rows, at least.
    assert report.flops >= 2 * 2 * 4096 * 256 * 19
    assert flops_source in report.flops_source
    assert "all-reduce" in {c.kind for c in report.census.collectives}
    assert len(report.census.errors) == 1  # the label histogram: 4096 labels into 19 bins
    assert report.step_seconds_bound > 0


@skip_without_toolchain("h100:1x1x2")
def test_gpu_flops_of_a_shard_map_step_are_per_device():
    mesh = compile_mesh("h100:1x1x2")
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def logits_sum(w, x):  # x: this device's rows
        return jax.lax.psum(jnp.sum(x @ w), "data")

    per_device = jax.shard_map(
        logits_sum, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False
    )
    jitted = jax.jit(per_device, in_shardings=(replicated, sharded), out_shardings=replicated)
    args = (
        jax.ShapeDtypeStruct((256, 19), jnp.float32, sharding=replicated),
        jax.ShapeDtypeStruct((2 * 4096, 256), jnp.float32, sharding=sharded),
    )
    report = compile_check.compile_report(jitted, args, targets.parse_target("h100:1x1x2"))
    assert "shard_map" in report.flops_source
    matmul = 2 * 4096 * 256 * 19
    assert matmul <= report.flops <= 1.1 * matmul
