r"""Runs a grid of trainings (loss x hyper-parameters x seed), one workdir per run, resumably.

    # The embedded-dataset study (docs/experiments.md): the grid lives in a Python file.
    python experiments/sweep.py --grid=experiments/grids/embedded.py --workdir=workdirs/study

    # An ad-hoc grid from a config: losses x t (for the tilted losses) x seeds.
    python experiments/sweep.py --config=configs/default.py --losses=ce,tce,stochastic_tce \
        --t=0.5,1,2,5 --seeds=0,1,2 --set=num_train_steps=300 --workdir=workdirs/sweep

    # What would run, without running it.
    python experiments/sweep.py --grid=experiments/grids/embedded.py --workdir=... --dry_run

Layout: ``<workdir>/<arm>/seed<k>/`` per run. The sweep writes ``run_spec.json`` there (the
config file and the overrides it asked for), then runs ``experiments/train_run.py`` on the
directory in a child process, its output appended to ``train.log``; the trainer fills in the
rest (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ..., and ``final_metrics.json``
at the very end).

Resuming: a run whose ``final_metrics.json`` exists is finished and skipped; a run started but
not finished resumes from its latest checkpoint (the trainer does that). A run directory whose
``run_spec.json`` differs from what the grid asks for, or that was not made by a sweep, is a
*conflict*: nothing is launched and nothing is overwritten; use another ``--workdir`` or move
the directory aside. Runs go seed-major (every arm with seed 0 first), so a sweep stopped half
way already holds complete comparisons for its first seeds. Ctrl-C stops the children; the next
invocation resumes.

Parallelism: ``--jobs=N`` runs N trainings at once (each child then gets one intra-op thread
for XLA and TensorFlow). Whether that is faster depends on the model: on 2 CPU cores, two at
once trained the default UNet 1.6x faster in all, the small UNet slower (docs/experiments.md).
Compiled programs are cached on disk in ``<workdir>/.jax_cache`` (JAX's persistent compilation
cache), so seeds after the first of an arm skip most of the compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # grid files import experiments.sweep

from tce_jax import objectives  # noqa: E402 (after the path of this checkout)
from tce_jax import workdir as workdir_lib  # noqa: E402
from tce_jax.train_metrics import format_duration  # noqa: E402

SPEC_FILE = "run_spec.json"
LOG_FILE = "train.log"
# Losses with a class-level tilt `loss.t`, swept by --t; every other loss gives one arm.
TILTED_LOSSES = objectives.TILTED_LOSSES

DONE, NEW, PARTIAL, CONFLICT = "done", "new", "partial", "conflict"


# ---------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of the grid, trained once per seed.

    Attributes:
      name: directory name of the arm (``[A-Za-z0-9_.=-]``), e.g. ``tce_t2``.
      overrides: dotted config fields and their values, e.g. ``{"loss.name": "tce",
        "loss.t": 2.0}``, applied after the grid's common overrides.
    """

    name: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A sweep: a config file, overrides common to every run, arms and seeds."""

    config: str  # "path/to/config.py[:variants]", relative to the repository root or absolute
    arms: Sequence[Arm]
    seeds: Sequence[int]
    common: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training: an arm with one seed, in ``<sweep workdir>/<arm>/seed<seed>``."""

    arm: str
    seed: int
    config: str
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def spec(self) -> dict[str, Any]:
        """What ``run_spec.json`` holds; ``train_run.py`` builds the config from it."""
        return _normalise(
            {"arm": self.arm, "seed": self.seed, "config": self.config,
             "overrides": self.overrides}
        )


def format_number(value: float) -> str:
    """Short, path-safe text for a hyper-parameter value: 2.0 -> '2', 0.5 -> '0.5'."""
    return f"{value:g}"


def make_arms(losses: Iterable[str], ts: Iterable[float] = ()) -> list[Arm]:
    """One arm per loss, or per (loss, t) for the tilted losses (``tce``, ``stochastic_tce``).

    A tilted loss with no ``ts`` gives one arm at the config's ``loss.t``.
    """
    ts = list(ts)
    arms = []
    for loss in losses:
        if loss in TILTED_LOSSES and ts:
            arms.extend(
                Arm(f"{loss}_t{format_number(t)}", {"loss.name": loss, "loss.t": float(t)})
                for t in ts
            )
        else:
            arms.append(Arm(loss, {"loss.name": loss}))
    return arms


def expand(grid: Grid) -> list[Run]:
    """The runs of a grid, seed-major: every arm with the first seed, then the next seed..."""
    names = [arm.name for arm in grid.arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Arm names must be unique; repeated: {duplicates}.")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+", name):
            raise ValueError(f"Arm name {name!r} must be a plain directory name ([A-Za-z0-9_.=-]).")
    if not grid.seeds:
        raise ValueError("The grid has no seeds.")
    if len(set(grid.seeds)) != len(grid.seeds):
        raise ValueError(f"Seeds must be distinct, got {list(grid.seeds)}.")
    runs = []
    for seed in grid.seeds:
        for arm in grid.arms:
            overrides = {**grid.common, **arm.overrides, "seed": int(seed)}
            runs.append(Run(arm.name, int(seed), grid.config, overrides))
    return runs


def load_grid_file(path: str) -> Grid:
    """Imports a grid file; it defines ``get_grid() -> Grid``."""
    module_spec = importlib.util.spec_from_file_location("_sweep_grid", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"Cannot load the grid file {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_grid"):
        raise AttributeError(f"The grid file {path} must define get_grid() -> sweep.Grid.")
    return module.get_grid()


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (numbers, true/false, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value (e.g. num_train_steps=300), got {item!r}.")
        out[key.removeprefix("config.")] = parse_value(value)
    return out


# ---------------------------------------------------------------------------------------------
# State of the run directories.


def _normalise(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so specs compare equal to what was written."""
    return json.loads(json.dumps(obj, sort_keys=True))


def run_dir(workdir: str, run: Run) -> str:
    return os.path.join(workdir, run.arm, f"seed{run.seed}")


def run_state(path: str, run: Run) -> tuple[str, str]:
    """``(state, reason)``: ``done``, ``partial`` (to resume), ``new`` or ``conflict``."""
    spec_path = os.path.join(path, SPEC_FILE)
    if not os.path.exists(spec_path):
        if os.path.isdir(path) and os.listdir(path):
            return CONFLICT, f"{path} exists but has no {SPEC_FILE} (not made by a sweep)"
        return NEW, ""
    try:
        with open(spec_path) as f:
            written = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return CONFLICT, f"{spec_path} is unreadable ({e})"
    if written != run.spec():
        return CONFLICT, f"{spec_path} differs from the grid: {_spec_diff(written, run.spec())}"
    if os.path.exists(os.path.join(path, workdir_lib.FINAL_METRICS_FILE)):
        return DONE, ""
    return PARTIAL, ""


def _spec_diff(written: dict, wanted: dict) -> str:
    old = {**{k: v for k, v in written.items() if k != "overrides"},
           **written.get("overrides", {})}
    new = {**{k: v for k, v in wanted.items() if k != "overrides"}, **wanted.get("overrides", {})}
    parts = [
        f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} in the grid"
        for k in sorted(set(old) | set(new))
        if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
    return "; ".join(parts)


def plan(workdir: str, runs: Sequence[Run]) -> dict[str, list[tuple[Run, str]]]:
    """Groups the runs by state; each entry is ``(run, reason)``."""
    states: dict[str, list[tuple[Run, str]]] = {DONE: [], PARTIAL: [], NEW: [], CONFLICT: []}
    for run in runs:
        state, reason = run_state(run_dir(workdir, run), run)
        states[state].append((run, reason))
    return states


def write_spec(path: str, run: Run) -> None:
    os.makedirs(path, exist_ok=True)
    workdir_lib.write_json(os.path.join(path, SPEC_FILE), run.spec())  # spec(): keys sorted


# ---------------------------------------------------------------------------------------------
# Launching and progress.


def default_runner() -> list[str]:
    return [sys.executable, os.path.join(ROOT, "experiments", "train_run.py")]


def child_env(workdir: str, jobs: int, compile_cache: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    # glibc malloc would hand XLA's large step buffers back to the system and fault them in
    # again on every step; kept instead, a step costs about 10% less CPU time (same numbers).
    # (The top pad keeps the worker threads' emptied heaps, on which XLA runs, from unmapping.)
    malloc = (("MMAP_THRESHOLD", 32 << 20), ("TRIM_THRESHOLD", 1 << 32), ("TOP_PAD", 1 << 28))
    for name, size in malloc:
        env.setdefault(f"MALLOC_{name}_", str(size))
    if compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, ".jax_cache"))
    if jobs > 1:
        # Several trainings share the cores: one compute thread each avoids oversubscription.
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    return env


_STEP_RE = re.compile(r"step (\d+)/(\d+)")


def log_progress(path: str) -> str:
    """``'step 120/300'`` from the end of a run's log, or ``''``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    matches = _STEP_RE.findall(tail)
    return f"step {matches[-1][0]}/{matches[-1][1]}" if matches else ""


class Progress:
    """Prints events on their own lines and a status line (rewritten in place on a terminal)."""

    def __init__(self, total: int, already_done: int, jobs: int, every_s: float, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.total, self.done, self.failed, self.jobs = total, already_done, 0, jobs
        self.durations: list[float] = []
        self.start = time.time()
        self.every_s = every_s
        self._last_line, self._last_time = "", 0.0

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{text}\n")
        self.stream.flush()
        self._last_line = ""

    def status(self, running: dict[str, str], remaining: int) -> None:
        elapsed = time.time() - self.start
        parts = [f"{self.done}/{self.total} done"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if running:
            parts.append("running " + ", ".join(
                f"{name} ({step})" if step else name for name, step in running.items()
            ))
        line = f"[sweep] {' | '.join(parts)} | elapsed {format_duration(elapsed)}"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            line += f" | ETA {format_duration(mean * (remaining + len(running)) / self.jobs)}"
        now = time.time()
        if self.tty:
            self.stream.write("\r\033[K" + line[:200])
            self.stream.flush()
        elif line != self._last_line and now - self._last_time >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_time = now
        self._last_line = line


@dataclasses.dataclass
class _Child:
    run: Run
    path: str
    process: subprocess.Popen
    log: Any
    start: float


def execute(
    workdir: str,
    runs: Sequence[Run],
    *,
    jobs: int = 1,
    runner: Sequence[str] | None = None,
    compile_cache: bool = True,
    poll_s: float = 2.0,
    status_every_s: float = 30.0,
    stream=None,
    on_start: Callable[[Run], None] | None = None,
) -> dict[str, list[str]]:
    """Runs what is not finished; returns ``{"done": [...], "ran": [...], "failed": [...]}``.

    Raises:
      RuntimeError: some run directory conflicts with the grid (nothing is launched).
    """
    states = plan(workdir, runs)
    if states[CONFLICT]:
        lines = "\n  ".join(reason for _, reason in states[CONFLICT])
        raise RuntimeError(
            f"{len(states[CONFLICT])} run director{'y' if len(states[CONFLICT]) == 1 else 'ies'} "
            f"conflict with the grid; nothing was launched or overwritten:\n  {lines}\n"
            "Use another --workdir for a different grid, or move those directories aside."
        )
    finished = [run.name for run, _ in states[DONE]]
    todo = [run for run in runs if run.name not in set(finished)]
    progress = Progress(len(runs), len(finished), jobs, status_every_s, stream)
    if finished:
        progress.event(f"[sweep] {len(finished)} finished run(s) skipped; {len(todo)} to run.")
    runner = list(runner or default_runner())
    env = child_env(workdir, jobs, compile_cache)
    pending = list(todo)
    running: list[_Child] = []
    ran, failed = [], []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                path = run_dir(workdir, run)
                write_spec(path, run)
                resumed = os.path.exists(os.path.join(path, workdir_lib.CONFIG_FILE))
                log = open(os.path.join(path, LOG_FILE), "a")  # noqa: SIM115 (closed on exit)
                log.write(f"\n=== sweep: {'resuming' if resumed else 'starting'} at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                log.flush()
                if on_start is not None:
                    on_start(run)
                process = subprocess.Popen(
                    [*runner, path], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                )
                running.append(_Child(run, path, process, log, time.time()))
                progress.event(
                    f"[sweep] {'resume' if resumed else 'start '} {run.name}  (log: "
                    f"{os.path.join(path, LOG_FILE)})"
                )
            time.sleep(poll_s)
            for child in list(running):
                code = child.process.poll()
                if code is None:
                    continue
                running.remove(child)
                child.log.close()
                seconds = time.time() - child.start
                final_file = os.path.join(child.path, workdir_lib.FINAL_METRICS_FILE)
                if code == 0 and os.path.exists(final_file):
                    ran.append(child.run.name)
                    progress.done += 1
                    progress.durations.append(seconds)
                    progress.event(f"[sweep] done   {child.run.name} in {format_duration(seconds)}"
                                   f"{_final_summary(child.path)}")
                else:
                    failed.append(child.run.name)
                    progress.failed += 1
                    progress.event(
                        f"[sweep] FAILED {child.run.name} (exit {code}) after "
                        f"{format_duration(seconds)}; last lines of its log:\n"
                        + _tail(os.path.join(child.path, LOG_FILE))
                    )
            progress.status(
                {c.run.name: log_progress(os.path.join(c.path, LOG_FILE)) for c in running},
                len(pending),
            )
    except KeyboardInterrupt:
        for child in running:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT)
        for child in running:
            try:
                child.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.process.kill()
            child.log.close()
        progress.event("[sweep] interrupted; run the same command again to resume.")
        raise
    progress.event(
        f"[sweep] finished: {len(finished) + len(ran)}/{len(runs)} runs done "
        f"({len(ran)} this time), {len(failed)} failed, in "
        f"{format_duration(time.time() - progress.start)}."
    )
    return {"done": finished + ran, "ran": ran, "failed": failed}


def _final_summary(path: str) -> str:
    try:
        with open(os.path.join(path, workdir_lib.FINAL_METRICS_FILE)) as f:
            final = json.load(f)
    except (OSError, json.JSONDecodeError):
        return ""
    figures = final.get("validation") or next(iter(final.values()), {})
    if "miou" not in figures:
        return ""
    split = "validation" if "validation" in final else next(iter(final))
    return (f"  ({split} mIoU {100 * figures['miou']:.1f}, worst-class IoU "
            f"{100 * figures.get('worst_iou', float('nan')):.1f})")


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# Command line.


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def grid_from_args(args: argparse.Namespace) -> Grid:
    if args.grid:
        if args.config or args.losses:
            raise SystemExit("Give either --grid or --config/--losses/--t, not both.")
        grid = load_grid_file(args.grid)
        if args.seeds:
            grid = dataclasses.replace(grid, seeds=_ints(args.seeds))
    else:
        if not (args.config and args.losses):
            raise SystemExit("Give --grid=FILE, or --config=FILE with --losses=a,b,...")
        grid = Grid(
            config=args.config,
            arms=make_arms([x for x in args.losses.split(",") if x], _floats(args.t or "")),
            seeds=_ints(args.seeds or "0,1,2"),
        )
    common = {**grid.common, **parse_assignments(args.set)}
    if args.data_dir:
        common["data.data_dir"] = args.data_dir
    return dataclasses.replace(grid, common=common)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="root of the sweep's run directories")
    parser.add_argument("--grid", help="a grid file defining get_grid() -> Grid")
    parser.add_argument("--config", help="config file[:variants] (without --grid)")
    parser.add_argument("--losses", help="comma-separated loss names (without --grid)")
    parser.add_argument("--t", help="comma-separated tilts for tce/stochastic_tce")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; overrides grid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set=num_train_steps=300")
    parser.add_argument("--data_dir", default="", help="TFDS data dir for every run")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    parser.add_argument("--runner", default="",
                        help="command that trains one run dir (default: train_run.py)")
    parser.add_argument("--no_compile_cache", action="store_true",
                        help="do not use JAX's persistent compilation cache")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}.")

    grid = grid_from_args(args)
    runs = expand(grid)
    workdir = os.path.abspath(args.workdir)
    if args.dry_run:
        states = plan(workdir, runs)
        print(f"{len(runs)} runs ({len(grid.arms)} arms x {len(grid.seeds)} seeds) "
              f"from {grid.config} in {workdir}; common overrides {grid.common}")
        for state in (DONE, PARTIAL, NEW, CONFLICT):
            for run, reason in states[state]:
                own = {k: v for k, v in run.overrides.items()
                       if k not in grid.common or grid.common[k] != v}
                print(f"  {state:8s} {run.name:32s} {reason or own}")
        return 1 if states[CONFLICT] else 0
    os.makedirs(workdir, exist_ok=True)
    try:
        result = execute(
            workdir,
            runs,
            jobs=args.jobs,
            runner=shlex.split(args.runner) if args.runner else None,
            compile_cache=not args.no_compile_cache,
        )
    except RuntimeError as e:
        print(f"[sweep] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
