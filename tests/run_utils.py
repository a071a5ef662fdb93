"""Helpers shared by the tests that run the command line or inspect finished training workdirs."""

import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time

import fork_server
import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds for one command-line run; a hang fails the test instead of the suite


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def latest_checkpoint(workdir) -> tuple[int, dict]:
    """(step, state as a nested dict of numpy arrays) of the workdir's latest checkpoint."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    manager.close()
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    state = checkpointer.restore(path, target)
    checkpointer.close()
    return step, jax.device_get(state)


def flat_leaves(tree, prefix="") -> dict[str, np.ndarray]:
    """{'/params/Conv_0/kernel': array, ...}; empty (None) nodes are dropped."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {} if tree is None else {prefix: np.asarray(tree)}
    out = {}
    for key, sub in items:
        out.update(flat_leaves(sub, f"{prefix}/{key}"))
    return out


def assert_trees_close(actual, expected, *, rtol=0.0, atol=0.0, scaled=0.0) -> None:
    """Leaf-wise allclose; `scaled` adds an absolute tolerance of scaled * max|leaf|."""
    got, want = flat_leaves(actual), flat_leaves(expected)
    assert got.keys() == want.keys()
    for key in want:
        tolerance = atol + scaled * float(np.abs(want[key]).max(initial=0.0))
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=tolerance, err_msg=key)


def set_fields(config, **fields):
    """Sets dotted config fields (`set_fields(c, **{"loss.t": 2.0})`); returns the config."""
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_flags(workdir, data_dir, *overrides, config="default.py:tiny") -> list[str]:
    """The flags of a run of `configs/CONFIG` in `workdir` on the prepared data in `data_dir`.
    The config path is absolute, so the flags mean the same in any working directory."""
    return [
        f"--config={os.path.join(ROOT, 'configs', config)}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *overrides,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_flags(index: int, count: int, port: int) -> list[str]:
    """The flags that make a run process `index` of `count`, coordinated on 127.0.0.1:port."""
    return [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={count}",
        f"--config.distributed.process_id={index}",
    ]


@dataclasses.dataclass
class MainResult:
    """What `python -m tce_jax.main ...` ended with, as `subprocess.run` reports it (`stderr` is
    empty where it went to `stdout`)."""

    returncode: int
    stdout: str
    stderr: str


# Restores SIGINT's default action before starting the command line, as an interactive shell
# does: a child of a non-interactive shell or of a background job inherits SIGINT ignored, and
# Python keeps it so.
_INTERACTIVE = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'tce_jax.main', *sys.argv[1:]])"
)


def start_main(
    *args: str, devices: int = 1, interactive: bool = False, fresh: bool = False, **popen
) -> subprocess.Popen:
    """Starts `python -m tce_jax.main ARGS` as a process of its own, from the repository root,
    on `devices` fake CPU devices; for what needs a real process (signals, a lock another
    process holds, several processes, provenance of a real command). JAX_DISABLE_MOST_OPTIMIZATIONS
    and the shared compilation cache come with the environment, but not the test process's
    XLA_FLAGS (see conftest.py): it compiles with XLA's default emitters, as a user's run.
    `interactive`: SIGINT interrupts it, as in a terminal.
    Output is captured as text (stdout and stderr apart) unless `popen` says otherwise.

    The run is forked from this worker's fork server (tests/fork_server.py: no import time;
    the Popen is of a client that stands for the run), or with `fresh` a new interpreter (for
    a test that needs the run's own process id, or the start-up of a real command)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    if fork_server.AVAILABLE and not fresh:
        return fork_server.start(args, interactive=interactive, cwd=ROOT, env=env, **popen)
    command = ["-c", _INTERACTIVE] if interactive else ["-m", "tce_jax.main"]
    return subprocess.Popen([sys.executable, *command, *args], cwd=ROOT, env=env, **popen)


def start_processes(*args: str, count: int, **start) -> list[subprocess.Popen]:
    """Starts every process of one `count`-process run (`start_main` for each)."""
    if count == 1:
        return [start_main(*args, **start)]
    port = free_port()
    return [start_main(*args, *process_flags(i, count, port), **start) for i in range(count)]


def wait_all(procs, timeout: float = TIMEOUT) -> list[MainResult]:
    """Waits for every process (`timeout` for all together); kills the rest if one fails to end
    in time (then raises subprocess.TimeoutExpired)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(MainResult(proc.returncode, out or "", err or ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def run_main(*args: str, timeout: float = TIMEOUT, **start) -> MainResult:
    """Runs `python -m tce_jax.main ARGS` to its end in a process of its own (`start_main`)."""
    [result] = wait_all([start_main(*args, **start)], timeout)
    return result


def run_main_in_process(*args: str) -> MainResult:
    """Runs `python -m tce_jax.main ARGS` inside the test process: the same flag parsing, error
    handling and exit status as the command line, on this process's devices and compilation
    settings, without the start-up of a new Python with TensorFlow and JAX (most of a tiny
    run's time). Signals, locks held by another process and multi-process runs need a real
    process (`run_main`); everything else can run here."""
    from absl import flags, logging

    from tce_jax import main

    verbosity, argv = logging.get_verbosity(), sys.argv
    sys.argv = [main.__file__, *args]  # what provenance.jsonl records as the command
    _reset_flags(flags.FLAGS)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main.main(main.parse_flags(sys.argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        _reset_flags(flags.FLAGS)
        logging.set_verbosity(verbosity)
    return MainResult(code, out.getvalue(), err.getvalue())


def _reset_flags(flag_values) -> None:
    """Back to before any parse: ml_collections defines a `--config.FIELD` flag for every field
    of the config file it loads, and refuses to define one twice."""
    for name in list(flag_values):
        if name.startswith("config."):
            delattr(flag_values, name)
    flag_values.unparse_flags()
