"""Checkpoints of a training run: what is kept, what "best" means, how a restore is verified,
and how a run stops (preemption, divergence) without losing or corrupting them.

Each step directory `WORKDIR/checkpoints/N/` holds three Orbax items:

* `default/`: the train state (`ocp.args.StandardSave`);
* `checksums/`: the SHA-256 of every leaf's bytes as they were written (JSON), checked with the
  leaves' finiteness after every restore, so a flipped byte is refused instead of trained on;
* `metrics/`: `{"miou": ...}` (Orbax's own metrics item), for a state that was evaluated.

Kept: the latest `config.keep_checkpoints` steps, plus the step with the best validation mIoU
among the evaluated ones. The metric lives on disk with its checkpoint, so the best step is
still known, and kept, after a restart.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging as py_logging
import math
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath

STATE_ITEM = "default"  # the item name Orbax gives a single-item checkpoint (same layout)
CHECKSUM_ITEM = "checksums"
BEST_METRIC = "miou"
MIN_SHARED_SLICE = 2**20  # bytes a replica writes of an array it shares with others


class RunStopped(RuntimeError):
    """A run ended on purpose with a one-line message for the user; `exit_code` for the CLI."""

    exit_code = 1


class CheckpointError(RunStopped):
    """A checkpoint exists but cannot be restored or verified; nothing was deleted."""


class NonFiniteStateError(ValueError):
    """The state to be saved holds NaN or infinite values; `leaves` names them."""

    def __init__(self, leaves: list[str]):
        super().__init__(f"non-finite values in {', '.join(leaves[:3])}")
        self.leaves = leaves


# ---------------------------------------------------------------------------------------------
# The manager: latest N plus the best by validation mIoU.


def best_metric(metrics) -> float:
    """Orbax `best_fn`: the validation mIoU of a checkpoint's metrics (higher is better)."""
    value = float(metrics.get(BEST_METRIC, math.nan))
    return value if math.isfinite(value) else -math.inf


def create_checkpoint_manager(directory: str, keep_latest: int) -> ocp.CheckpointManager:
    """Keeps the latest `keep_latest` steps plus the best one by validation mIoU.

    `best_fn` makes Orbax write each checkpoint's metrics into its step directory (without it
    none are written and `best_step()` is the latest step). `max_to_keep` would then keep the
    best N, not the latest; resuming needs the latest, so the preservation policy keeps both.
    A checkpoint saved without an evaluation has no metrics: only LatestN keeps it, and it is
    never the best.
    """
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(keep_latest),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=best_metric, best_mode="max", create=True
    )
    logging.get_absl_logger().addFilter(_drop_expected_warnings)  # added once
    # Orbax's default array handler, except that replicas share the writing of an array only
    # where each one's part is at least 1 MiB. Sharing slices the array on every device, which
    # compiles a program per array and device at the first save (112 for the tiny U-Net on 8
    # devices, seconds of CPU); for the many small arrays (biases, norms) that costs more than
    # the parallel write saves. Registered for the process, as Orbax's default is.
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SHARED_SLICE),
        override=True,
    )
    # Named items: the state item keeps Orbax's single-item name, so without these handlers a
    # fresh manager would take the step directories for single-item checkpoints.
    handlers = {
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        CHECKSUM_ITEM: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(_absolute(directory), options=options, item_handlers=handlers)


# Orbax warns of what this module does on purpose: a save without metrics once `best_fn` is
# set (a checkpoint between evaluations), which would interleave with progress lines, and the
# replacement of its default `jax.Array` handler at each `create_checkpoint_manager` (other
# handler overrides still warn).
def _drop_expected_warnings(record: py_logging.LogRecord) -> bool:
    text = str(record.msg)
    if text.startswith("Requested `tracked_metric`"):
        return False
    if text.startswith("Type handler registry type"):
        return not record.getMessage().endswith("overriding jax.Array")
    return True


def _absolute(directory) -> epath.Path:
    if "://" in str(directory):  # gs://, s3://, ...
        return epath.Path(directory)
    return epath.Path(os.path.abspath(directory))


def step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


# ---------------------------------------------------------------------------------------------
# Host values, finiteness and checksums.


def _host_value(x) -> np.ndarray:
    """The full value of a leaf on this host (one replica of a replicated global array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(
                f"Cannot checksum a leaf of shape {x.shape} sharded across processes; "
                "checkpoint verification needs the state replicated on every process."
            )
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def host_leaves(state) -> dict[str, np.ndarray]:
    """{'.params["Conv_0"]["kernel"]': array, ...}: every leaf of `state` as numpy on the host."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): _host_value(leaf) for path, leaf in flat}


def non_finite_leaves(leaves: dict[str, np.ndarray]) -> list[str]:
    return [
        name
        for name, value in leaves.items()
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all()
    ]


def leaf_checksum(value: np.ndarray) -> str:
    """SHA-256 of a leaf's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))  # no copy
    return digest.hexdigest()


def checksums(leaves: dict[str, np.ndarray]) -> dict[str, str]:
    """{leaf name: SHA-256}, hashed in threads (hashlib releases the GIL on large buffers)."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(leaf_checksum, leaves.values())
        return dict(zip(leaves, digests, strict=True))


# ---------------------------------------------------------------------------------------------
# Save and restore.


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state, metrics: dict[str, float] | None
) -> None:
    """Starts an (asynchronous) save of `state` with its checksums and `metrics`.

    Raises NonFiniteStateError, and writes nothing, if the state holds NaN or inf.
    """
    leaves = host_leaves(state)
    bad = non_finite_leaves(leaves)
    if bad:
        raise NonFiniteStateError(bad)
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                CHECKSUM_ITEM: ocp.args.JsonSave({"sha256": checksums(leaves)}),
            }
        ),
        metrics=metrics,
        force=True,
    )


def _innermost_message(error: BaseException) -> str:
    """The first line of the deepest cause of `error` (Orbax wraps TensorStore's error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def _refuse(manager, step: int, problem: str) -> CheckpointError:
    path = step_directory(manager, step)
    earlier = [s for s in manager.all_steps() if s < step]
    if earlier:
        fix = (
            f"move {path} aside (e.g. `mv {path} {path}.bad`) to resume from step "
            f"{max(earlier)}, or use a new --workdir"
        )
    else:
        fix = f"move {path} aside or use a new --workdir to start afresh"
    return CheckpointError(
        f"The checkpoint of step {step} in {manager.directory} is corrupt: {problem}. "
        f"Nothing was deleted; {fix}."
    )


def _unreadable_value(item_directory: epath.Path, batch: int = 64) -> str | None:
    """The first error met reading every stored value of an Orbax (OCDBT) item, or None.

    Orbax reads all arrays concurrently; when one read fails (a truncated file), it returns
    while others are pending, and those later fail in an event loop that has closed, printing
    tracebacks over the real error. Reading every value here first, waiting for each, finds a
    damaged file without that. (Flipped bytes read fine: the checksums catch those.)
    """
    if not (item_directory / "manifest.ocdbt").exists():
        return None  # not OCDBT: left to Orbax
    base = str(item_directory)
    base = base if "://" in base else f"file://{base}"
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": base + "/"}).result()
        keys = store.list().result()
        for start in range(0, len(keys), batch):
            pending = [(key, store.read(key)) for key in keys[start : start + batch]]
            errors = []
            for key, future in pending:  # wait for all of them before reporting one
                try:
                    future.result()
                except Exception as e:  # TensorStore raises ValueError for most I/O errors
                    errors.append(f"{key.decode(errors='replace')}: {_innermost_message(e)}")
            if errors:
                return errors[0]
    except Exception as e:  # a damaged manifest or index
        return _innermost_message(e)
    return None


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state):
    """The state saved at `step`, verified: every leaf finite and equal to what was written.

    Raises CheckpointError (one line: the step, the problem, the fix) for a checkpoint that
    cannot be read, does not match `abstract_state`, or fails verification. Nothing is deleted:
    Orbax removes old steps only after a later save, and this raises before any.
    """
    has_checksums = (step_directory(manager, step) / CHECKSUM_ITEM).exists()
    unreadable = _unreadable_value(step_directory(manager, step) / STATE_ITEM)
    if unreadable:
        raise _refuse(manager, step, f"cannot read it ({unreadable})")
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if has_checksums:
        items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for truncated or mismatched files.
        raise _refuse(
            manager,
            step,
            f"cannot read it ({_innermost_message(e)}); if it is intact, it was written by a "
            "different config (model, classes, optimizer)",
        ) from e
    state = restored[STATE_ITEM]
    leaves = host_leaves(state)
    bad = non_finite_leaves(leaves)
    if bad:
        raise _refuse(manager, step, f"non-finite values in {', '.join(bad[:3])}")
    if not has_checksums:
        logging.warning("Checkpoint step %d has no checksums (older format): not verified.", step)
        return state
    expected = restored[CHECKSUM_ITEM].get("sha256")
    actual = checksums(leaves)
    if not isinstance(expected, dict) or actual.keys() != expected.keys():
        raise _refuse(manager, step, "its leaves differ from those its checksums list")
    changed = [name for name in expected if actual[name] != expected[name]]
    if changed:
        raise _refuse(
            manager,
            step,
            f"{len(changed)} array(s) differ from what was written ({', '.join(changed[:3])})",
        )
    return state


# ---------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.


class StopRequests:
    """While active, SIGTERM and SIGINT ask the training loop to stop after the current step.

    `requested(step)` is True at the step where every process stops. One process: the step at
    which a signal arrived. Several processes (`jax.distributed` with its preemption service):
    JAX's preemption sync point, which every process reaches at the same step; the service
    watches SIGTERM itself, so SIGINT is passed on to it as a SIGTERM to this process.
    A second signal acts as usual (SIGTERM ends the process, SIGINT raises KeyboardInterrupt).
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self._previous: dict[int, Any] = {}
        self._synced = False
        self.signal_name: str | None = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Training outside the main thread: SIGTERM/SIGINT not handled.")
            return self
        self._synced = jax.process_count() > 1 and _preemption_service_running()
        signums = [signal.SIGINT] if self._synced else [signal.SIGTERM, signal.SIGINT]
        for signum in signums:
            # An ignored signal stays ignored: e.g. a background job of a non-interactive
            # shell ignores the SIGINT of a Ctrl-C meant for the foreground.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        self._restore_handlers()
        if self._synced:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def requested(self, step: int) -> bool:
        """Whether to stop after `step`; call at every step (the multi-process protocol)."""
        if self._synced:
            return self._manager.reached_preemption(step)
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        if self.signal_name is None:  # only another process (or JAX's notifier) saw it
            return "SIGTERM (preemption notice)"
        return self.signal_name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(signal.Signals[self.signal_name or "SIGTERM"])


def _preemption_service_running() -> bool:
    # jax.distributed.initialize starts the service unless this option turned it off.
    return bool(jax.config.jax_enable_preemption_service)


class Preempted(RunStopped):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(RunStopped):
    """The loss or gradient norm became NaN or infinite; nothing from that step on is saved."""
