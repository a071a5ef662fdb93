"""What a jitted step costs on a target, from compiling it there (see :mod:`tce_jax.targets`).

:func:`compile_report` lowers and compiles a ``jax.jit`` function for abstract inputs sharded
over a target's compile-only devices and reads back, per device: memory (arguments, outputs,
temporaries, aliasing) against the device's memory, FLOPs, a lower bound on the step time, and
a census of the optimized HLO (:func:`hlo_census`): collectives, and floating-point scatters,
of which one into an output much smaller than its updates is an error (atomic adds that
contend on few addresses; on GPUs a compare-and-swap loop for bfloat16).

Without a device XLA does not autotune: GPU temporaries exclude cuDNN/cuBLAS workspace (a lower
bound), and GPU executables have no cost analysis, so their FLOPs are XLA's generic count of
the unoptimized program per device (``flops_source`` says which). Every FLOP count, TPU ones
too, counts a loop body once (``lax.scan`` over sliding windows or micro-batches): for such
programs FLOPs and the step-time bound are lower bounds only.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence

import jax

from tce_jax.targets import GIB, Target

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
# A float scatter is an error when its updates outnumber its output elements this many times
# (e.g. counts into a few classes' bins); a max-pool gradient (about 4x) is not.
CONTENDED_UPDATES_PER_ELEMENT = 64

_ARRAY = re.compile(r"\b([a-z]+)(\d*)[a-z0-9]*\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")


def _arrays(shape: str) -> list[tuple[str, int, int]]:
    """``(element type, bytes per element, elements)`` of each array in an HLO shape such
    as ``(f32[8,4]{1,0}, pred[])``."""
    out = []
    for match in _ARRAY.finditer(shape):
        kind, bits, dims = match.groups()
        elements = 1
        for d in filter(None, dims.split(",")):
            elements *= int(d)
        out.append((kind + bits, max(int(bits or 8) // 8, 1), elements))
    return out


def _bytes(shape: str) -> int:
    return sum(size * elements for _, size, elements in _arrays(shape))


def _closing(text: str, depth: int = 0) -> int:
    """Index of the parenthesis that brings ``depth`` (open before ``text``) back to 0."""
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index
    return len(text)


def _split_instruction(rest: str) -> tuple[str, str, list[str]]:
    """``shape, opcode, operand names`` of the text after ``%name = ``."""
    if rest.startswith("("):  # a tuple shape
        end = _closing(rest) + 1
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    return shape, opcode, re.findall(r"%([^\s,)]+)", rest[: _closing(rest, 1)])


@dataclasses.dataclass(frozen=True)
class Collective:
    """Collectives of one kind in a program: how many appear in its text (a loop body's count
    once) and the bytes their operands hold on each device."""

    kind: str
    count: int
    operand_bytes: int


@dataclasses.dataclass(frozen=True)
class FloatScatter:
    """A floating-point ``scatter`` or ``select-and-scatter`` (a max-pool's gradient): its HLO
    name, output shape, and updates per output element."""

    name: str
    shape: str
    updates_per_element: float

    @property
    def contended(self) -> bool:
        return self.updates_per_element >= CONTENDED_UPDATES_PER_ELEMENT


@dataclasses.dataclass(frozen=True)
class Census:
    collectives: tuple[Collective, ...]
    float_scatters: tuple[FloatScatter, ...]

    @property
    def errors(self) -> list[str]:
        return [
            f"floating-point scatter {s.name} into {s.shape}: {s.updates_per_element:.0f} "
            "updates per output element (atomic adds on few addresses)"
            for s in self.float_scatters
            if s.contended
        ]


def hlo_census(hlo_text: str) -> Census:
    """Collectives and floating-point scatters of an (optimized) HLO module's text."""
    shapes, instructions = {}, []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, (shape, opcode, operands) = match.group(1), _split_instruction(match.group(2))
            shapes[name] = shape
            instructions.append((name, shape, opcode, operands))
    counts: dict[str, list[int]] = {}
    scatters = []
    for name, shape, opcode, operands in instructions:
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES:  # an async pair counts once, at its start
            entry = counts.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += sum(_bytes(shapes.get(o, "")) for o in operands)
        elif opcode in ("scatter", "select-and-scatter") and len(operands) >= 3:
            # scatter(operands..., indices, updates...); select-and-scatter(operand, source, init)
            out = _arrays(shape)
            updates = _arrays(shapes.get(operands[-1 if opcode == "scatter" else 1], ""))
            if out and updates and out[0][0].startswith(("f", "bf")):
                ratio = updates[0][2] / max(out[0][2], 1)
                scatters.append(FloatScatter(name, shape, ratio))
    collectives = tuple(Collective(k, c, b) for k, (c, b) in sorted(counts.items()))
    return Census(collectives, tuple(scatters))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """One compiled program on one target; byte and FLOP counts are per device."""

    name: str
    target: Target
    devices: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # outputs that reuse (donated) argument buffers
    flops: float
    flops_source: str
    compute_dtype: str
    census: Census
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs and temporaries live at once, donated buffers counted once."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def memory_bytes(self) -> int:
        return self.target.accelerator.memory_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.memory_bytes

    @property
    def step_seconds_bound(self) -> float:
        """No step is faster than its FLOPs at peak rate, nor than reading its arguments and
        writing its outputs once at full memory bandwidth."""
        accelerator = self.target.accelerator
        compute = self.flops / accelerator.peak_flops[self.compute_dtype]
        traffic = (self.argument_bytes + self.output_bytes) / accelerator.memory_bandwidth
        return max(compute, traffic)

    def summary(self) -> str:
        """A few lines for people; the last ones name any census error."""
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        lines = [
            f"{self.name} on {self.target.name} ({self.devices} x "
            f"{self.target.accelerator.name}), compiled in {self.compile_seconds:.0f} s:",
            f"  memory per device: {gib(self.peak_bytes)} of {gib(self.memory_bytes)} "
            f"({'fits' if self.fits else 'DOES NOT FIT'}; arguments {gib(self.argument_bytes)}, "
            f"outputs {gib(self.output_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"aliased {gib(self.alias_bytes)})",
            f"  {self.flops / 1e12:.3g} TFLOP per device ({self.flops_source}); step time "
            f">= {self.step_seconds_bound * 1e3:.3g} ms at peak {self.compute_dtype}",
            "  collectives: "
            + (
                ", ".join(
                    f"{c.kind} x{c.count} ({c.operand_bytes / 2**20:.1f} MiB)"
                    for c in self.census.collectives
                )
                or "none"
            ),
            f"  floating-point scatters: {len(self.census.float_scatters)}",
        ]
        return "\n".join(lines + [f"  ERROR: {e}" for e in self.census.errors])


def _cost(cost) -> dict:
    """``compiled.cost_analysis()`` as one dict (older jaxlibs return a list of them)."""
    if isinstance(cost, Sequence):
        cost = cost[0] if cost else None
    return dict(cost or {})


def _unoptimized_flops(lowered, devices: int) -> tuple[float, str]:
    """XLA's generic FLOP count of the program before partitioning, per device: the global
    program's count divided by ``devices``, except for a ``shard_map`` program, whose body
    already has per-device shapes."""
    from jax._src.lib import _jax

    hlo = lowered._lowering.hlo()
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo.as_hlo_module())
    flops = _cost(cost).get("flops", 0.0)
    text = hlo.as_hlo_text()
    if "xla.sdy.GlobalToLocalShape" in text or "SPMDFullToShardShape" in text:
        return flops, "XLA's count of the unoptimized shard_map body"
    return flops / devices, "XLA's count of the unoptimized program / devices"


def compile_report(
    jitted,
    args: Sequence,
    target: Target,
    *,
    name: str = "step",
    compute_dtype: str = "bfloat16",
) -> CompileReport:
    """Compile ``jitted`` (a ``jax.jit`` function whose shardings live on
    ``targets.compile_mesh(target)``) for ``args`` (``jax.ShapeDtypeStruct`` trees with those
    shardings) and report what it needs per device. ``compute_dtype`` picks the peak FLOP
    rate of the step-time bound. Compilation errors propagate."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    shardings = jax.tree.leaves(compiled.input_shardings)
    devices = len(shardings[0].device_set) if shardings else 1
    memory = compiled.memory_analysis()
    flops = _cost(compiled.cost_analysis()).get("flops")
    source = "optimized program"
    if not flops:  # GPU executables compiled without a device have no cost analysis
        flops, source = _unoptimized_flops(lowered, devices)
    return CompileReport(
        name=name,
        target=target,
        devices=devices,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        flops=float(flops),
        flops_source=source,
        compute_dtype=compute_dtype,
        census=hlo_census(compiled.as_text()),
        compile_seconds=seconds,
    )
