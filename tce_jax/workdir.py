"""The workdir of a run: where it may live, who may write it, and the record of each start.

* `resolve(path)`: local paths become absolute; `gs://` paths are kept as they are (every writer
  of a run handles them: Orbax, CLU's TensorBoard writer, and `etils.epath` for the files
  written here); any other `scheme://` is refused rather than written to a local directory
  called `scheme:`.
* `WorkdirLock`: one writer per workdir. `lock.json` in the workdir records host, process id,
  start time and command of the holder. On a local filesystem the file is also `flock`ed, so the
  operating system releases the lock when the holder dies, however it dies. A cloud bucket has
  no locks: there the file alone is advisory; a holder on this host whose process is gone is
  detected and replaced, one on another host can only be removed by hand (the message says how).
* `check_config`: a workdir with a checkpoint continues only the experiment of its
  `config.json`; every field may differ except `RESUMABLE_FIELDS` (run length, logging, paths,
  process layout), unless the change is explicitly allowed.
* `open_run`: all of the above at the start of a run, plus `config.json`,
  `config_history.jsonl` (each change of config.json, with old and new values) and
  `provenance.jsonl` (package versions, git commit, devices, command line, host, time).

File I/O goes through `etils.epath`, so the same code writes local and `gs://` workdirs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from etils import epath
from flax import traverse_util

LOCK_FILE = "lock.json"
CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
PROVENANCE_FILE = "provenance.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Written last by a run (`metrics.write_run_reports`): its presence means the run finished.
FINAL_METRICS_FILE = "final_metrics.json"
TRAIN_METRICS_FILE = "train_metrics.jsonl"

# Schemes every writer of a run supports: Orbax (tensorstore), CLU's writers (tf.io.gfile) and
# etils.epath. TensorFlow has no s3://, az:// or hf:// file system.
CLOUD_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# Fields that may change when a run resumes: how long it runs, how often it logs, evaluates and
# saves, whether it profiles, where data and weights are read from, and the process layout (jit
# and pmap give the same numbers). Everything else defines the experiment. Note: the
# learning-rate schedule decays over `num_train_steps`, so extending a run changes the rates
# after the resumed step.
RESUMABLE_FIELDS = frozenset(
    {
        "num_train_steps",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "profile_steps",
        "parallelism",
        "data.data_dir",
        "data.manual_dir",
        "data.final_eval_splits",
        "data.eval_batch_size",
        "data.prefetch",
        "model.pretrained",  # read only by a fresh start
    }
)
RESUMABLE_PREFIXES = ("distributed.",)

PACKAGES = {
    # name recorded -> distributions that provide it
    "tce_jax": ("tce_jax",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "flax": ("flax",),
    "optax": ("optax",),
    "orbax-checkpoint": ("orbax-checkpoint",),
    "clu": ("clu",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu"),
    "tensorflow-datasets": ("tensorflow-datasets", "tfds-nightly"),
    "ml-collections": ("ml-collections", "ml_collections"),
    "etils": ("etils",),
    "numpy": ("numpy",),
}


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Paths and files.


def resolve(path: str) -> str:
    """An absolute local path, or a `gs://` path unchanged; other schemes are refused."""
    match = _SCHEME.match(path)
    if match is None:
        return os.path.abspath(os.path.expanduser(path))
    if match.group(1).lower() not in CLOUD_SCHEMES:
        supported = ", ".join(f"{s}://" for s in CLOUD_SCHEMES)
        raise WorkdirError(
            f"--workdir={path}: {match.group(1)}:// is not supported (checkpoints, TensorBoard "
            f"logs and reports can be written to local paths and {supported}); use one of those."
        )
    return path


def is_local(path: str | os.PathLike) -> bool:
    return _SCHEME.match(os.fspath(path)) is None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON. Local files are replaced atomically (readers never see
    half a file); a cloud object is replaced whole by its upload anyway."""
    path = epath.Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    if not is_local(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends one JSON line (tf.io.gfile, behind epath for gs://, appends by rewriting)."""
    with epath.Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def latest_checkpoint_step(workdir: str) -> int | None:
    """The highest finished checkpoint step in `workdir/checkpoints`, or None.

    Orbax names each finished step's directory by the step number; unfinished saves are
    `<step>.orbax-checkpoint-tmp*` and are not counted.
    """
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return max(steps, default=None)


# ---------------------------------------------------------------------------------------------
# One writer per workdir.


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    """Exclusive use of a workdir by one process (a context manager; see the module doc)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = epath.Path(workdir) / LOCK_FILE
        self._fd: int | None = None
        self._held = False
        self.host = socket.gethostname()
        self.record = {
            "host": self.host,
            "pid": os.getpid(),
            "since": _now(),
            "command": sys.argv,
        }

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, holder: dict | None, hint: str = "") -> WorkdirError:
        holder = holder or {}
        return WorkdirError(
            f"workdir {self.workdir} is in use by process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {holder.get('since', '?')}; wait for it or use "
            f"another --workdir{hint}"
        )

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}  # written by a holder that died mid-write, or being written now
        return holder if isinstance(holder, dict) else {}

    def _announce_takeover(self, holder: dict | None) -> None:
        if holder:
            print(
                f"Taking over the lock of {self.workdir}: process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}) is not running.",
                flush=True,
            )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_local(self.path) and self._acquire_flock():
            return
        self._acquire_advisory()

    def _acquire_flock(self) -> bool:
        """Locks the local file with flock; False if the filesystem has no flock."""
        path = os.fspath(self.path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(self._read_holder()) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return False
                raise
            # The holder may have released (and removed) the file between our open and flock:
            # then we locked a file nobody else sees; start again on the current one.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        # flock is released by the OS when a holder dies: anything in the file is stale.
        self._announce_takeover(self._read_holder())
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._held = True
        return True

    def _acquire_advisory(self) -> None:
        """The lock file alone (cloud workdirs): best effort, two starts at the same instant
        can both succeed."""
        holder = self._read_holder()
        if holder is not None:
            pid, host = holder.get("pid"), holder.get("host")
            if host != self.host:
                raise self._in_use(
                    holder,
                    f" (if process {pid} on {host} is no longer running, delete {self.path})",
                )
            if isinstance(pid, int) and _process_alive(pid):
                raise self._in_use(holder)
            self._announce_takeover(holder)
        self.path.write_text(json.dumps(self.record) + "\n")
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding the flock: no one can lock the old file
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# The experiment of a workdir.


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as config.json holds it (tuples as lists)."""
    return json.loads(config.to_json_best_effort())


_ABSENT = "<absent>"


# Fields whose default is not what the code did before they existed: a run recorded without
# the field ran with this value.
BEHAVIOUR_BEFORE_FIELD = {
    "data.sampling_prior": "loss",  # the sampler used the loss's class prior
}


def absent_field_values() -> dict[str, Any]:
    """What a run whose config.json lacks a field ran with, flattened: the field's current
    default, or `BEHAVIOUR_BEFORE_FIELD` where the code behaved differently before it."""
    from tce_jax import config_lib

    base = config_to_dict(config_lib.get_base_config())
    return traverse_util.flatten_dict(base, sep=".") | BEHAVIOUR_BEFORE_FIELD


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
    """{dotted field: (old value, new value)} of every field that differs.

    A field the old config lacks (added to the code since) counts as unchanged while the new
    value is how the old code behaved: `BEHAVIOUR_BEFORE_FIELD` where the field's default
    differs from that, else its default in `config_lib.get_base_config()`.
    """
    old_flat = traverse_util.flatten_dict(old, sep=".")
    new_flat = traverse_util.flatten_dict(new, sep=".")
    defaults = absent_field_values()
    changes = {}
    for field in sorted(old_flat.keys() | new_flat.keys()):
        before = old_flat.get(field, defaults.get(field, _ABSENT))
        after = new_flat.get(field, _ABSENT)
        if before != after:
            changes[field] = (before, after)
    return changes


def is_resumable(field: str) -> bool:
    return field in RESUMABLE_FIELDS or field.startswith(RESUMABLE_PREFIXES)


def _describe(changes: Mapping[str, tuple]) -> str:
    return "; ".join(f"{field}: {old!r} -> {new!r}" for field, (old, new) in changes.items())


def check_config(
    workdir: str, config: ml_collections.ConfigDict, *, allow_change: bool = False
) -> tuple[int | None, dict | None, dict[str, tuple]]:
    """Compares `config` with the workdir's config.json when a checkpoint will be resumed.

    Returns (latest checkpoint step or None, the stored config or None, every change).
    Raises `WorkdirError` naming each changed field outside `RESUMABLE_FIELDS`, unless
    `allow_change`.
    """
    step = latest_checkpoint_step(workdir)
    path = epath.Path(workdir) / CONFIG_FILE
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is None:
        return step, None, {}
    changes = config_changes(stored, config_to_dict(config))
    experiment = {f: c for f, c in changes.items() if not is_resumable(f)}
    if step is not None and experiment and not allow_change:
        raise WorkdirError(
            f"workdir {workdir} holds a checkpoint (step {step}) of a different experiment; "
            f"these fields differ from its {CONFIG_FILE}: {_describe(experiment)}. Use the "
            "original values, another --workdir, or --allow_config_change to continue with the "
            f"new ones (recorded in {CONFIG_HISTORY_FILE})."
        )
    return step, stored, changes


def record_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    step: int | None,
    stored: dict | None,
    changes: Mapping[str, tuple],
    allowed_by_flag: bool,
) -> None:
    """Writes config.json; a change of an existing one is also appended to the history."""
    path = epath.Path(workdir) / CONFIG_FILE
    if stored is not None and not changes:
        return
    if stored is not None:
        experiment = sorted(f for f in changes if not is_resumable(f))
        if experiment and step is not None:
            print(
                f"Continuing {workdir} with a changed experiment: {_describe(changes)}", flush=True
            )
        append_jsonl(
            epath.Path(workdir) / CONFIG_HISTORY_FILE,
            {
                "time": _now(),
                "resumed_from_step": step,
                "changes": {f: {"old": old, "new": new} for f, (old, new) in changes.items()},
                "experiment_fields_changed": experiment,
                "allowed_by": "--allow_config_change" if experiment and allowed_by_flag else None,
            },
        )
    write_json(path, config_to_dict(config))


# ---------------------------------------------------------------------------------------------
# Provenance.


def package_versions() -> dict[str, str]:
    versions = {}
    for name, distributions in PACKAGES.items():
        versions[name] = "not installed"
        for distribution in distributions:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[name] = importlib.metadata.version(distribution)
                break
    return versions


def _git(directory: str, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", directory, *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """{"commit": HEAD or "unknown", "dirty": bool or None} of the checkout tce_jax runs from
    (unknown when the package is installed outside one)."""
    package = os.path.dirname(os.path.abspath(__file__))
    top = _git(package, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(os.path.join(top, "tce_jax")) != os.path.realpath(package):
        return {"commit": "unknown", "dirty": None}
    commit = _git(top, "rev-parse", "HEAD") or "unknown"
    status = _git(top, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_summary() -> dict[str, Any]:
    import jax

    return {
        "platform": jax.default_backend(),
        "kinds": sorted({d.device_kind for d in jax.devices()}),
        "count": jax.device_count(),
        "local_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def provenance(mode: str, resumed_from_step: int | None) -> dict[str, Any]:
    return {
        "time": _now(),
        "mode": mode,
        "resumed_from_step": resumed_from_step,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_state(),
        "devices": device_summary(),
    }


# ---------------------------------------------------------------------------------------------
# The start of a run.


def _agree_across_processes(ok: bool) -> bool:
    """Process 0's `ok`, on every process (a no-op with one process)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def open_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    allow_config_change: bool = False,
    details: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Holds the workdir for the body: lock, config check and records, by process 0 only.

    `mode="train"` refuses a resume with a different experiment (see `check_config`) and
    records config.json; `mode="evaluate"` only prints the fields that differ (evaluation
    settings may legitimately change). Both take the lock (they write the same reports) and
    append to provenance.jsonl (with `details`, e.g. the checkpoint evaluated). The lock is
    released when the body ends, also on exceptions.
    """
    import jax

    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
            step, stored, changes = check_config(
                workdir, config, allow_change=allow_config_change or mode != "train"
            )
        except Exception as e:  # any failure must reach the other processes, or they wait
            lock.release()
            error = e
    if not _agree_across_processes(error is None):
        if error is not None:
            raise error
        raise WorkdirError(f"process 0 could not open workdir {workdir}; its output says why")
    try:
        if jax.process_index() == 0:
            if mode == "train":
                record_config(
                    workdir,
                    config,
                    step=step,
                    stored=stored,
                    changes=changes,
                    allowed_by_flag=allow_config_change,
                )
            elif changes:
                print(
                    f"Note: the config differs from {CONFIG_FILE}: {_describe(changes)}", flush=True
                )
            resumed_from = step if mode == "train" else None
            record = {**provenance(mode, resumed_from), **(details or {})}
            append_jsonl(epath.Path(workdir) / PROVENANCE_FILE, record)
        yield
    finally:
        lock.release()
