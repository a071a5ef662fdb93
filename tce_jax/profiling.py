"""Profiling a few training steps for TensorBoard's Profile tab (`config.profile_steps`).

`jax.profiler.start_trace(logdir)` writes `logdir/plugins/profile/<time>/<host>.xplane.pb`
(and a `trace.json.gz`), where TensorBoard pointed at the workdir finds it. clu's
`periodic_actions.Profile` wraps the same calls, but stops without waiting for the traced
steps to finish (steps are dispatched asynchronously) and leaves a trace open when training
ends first; this helper does both.
"""

import jax

# Steps run before the trace starts: the first compiles, the next ones settle.
WARMUP_STEPS = 2


class StepProfiler:
    """Traces `num_steps` training steps, after `WARMUP_STEPS` steps of this run.

    Call it after every training step with the step number and the new state; `close()` after
    the loop. Does nothing when `num_steps` is 0 or `enabled` is False (other processes).
    """

    def __init__(self, logdir: str, num_steps: int, *, start_step: int, enabled: bool = True):
        self.logdir = logdir
        self.num_steps = num_steps if enabled else 0
        self.first = start_step + WARMUP_STEPS + 1  # the first traced step
        self.running = False
        self.last_step = start_step

    def __call__(self, step: int, state) -> None:
        if not self.num_steps:
            return
        if step == self.first - 1:
            jax.block_until_ready(state)  # keep the warm-up steps out of the trace
            jax.profiler.start_trace(self.logdir)
            self.running = True
        elif self.running and step == self.first + self.num_steps - 1:
            self._stop(state, step)
        self.last_step = step

    def close(self, state=None) -> None:
        """Stops a trace still running (training ended inside the profiled steps)."""
        if self.running:
            self._stop(state, self.last_step)
        elif self.num_steps and self.last_step < self.first - 1:
            print(
                f"No profile: profiling starts after {WARMUP_STEPS} warm-up steps, and this run "
                f"ended at step {self.last_step}.",
                flush=True,
            )

    def _stop(self, state, last_step: int) -> None:
        jax.block_until_ready(state)  # the traced steps must finish inside the trace
        jax.profiler.stop_trace()
        self.running = False
        # Printed: the CLI keeps absl logging at WARNING.
        print(
            f"Profile of steps {self.first}-{last_step} written to {self.logdir}/plugins/profile "
            "(TensorBoard: Profile tab).",
            flush=True,
        )
