"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

`Trainer` builds what a run needs once (data, model, the compiled steps of `tce_jax.steps`,
checkpoints); `Trainer.train` is the training loop, top to bottom. The config is checked
before (`tce_jax.startup.start`, where every process that trains begins).

The step RNG is folded from the step number and the data of a step are a pure function of
(seed, step), so a run restored from its latest checkpoint continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util

from tce_jax import (
    checkpointing,
    config_lib,
    datasets,
    input_pipeline,
    metrics,
    models,
    objectives,
    parallel,
    pretrained,
    pretrained_segformer,
    profiling,
    programs,
    sampling,
    train_metrics,
)
from tce_jax import workdir as workdir_lib
from tce_jax.datasets import class_index
from tce_jax.steps import TrainState


class Trainer:
    """Holds what a run builds once: data, model, compiled steps, checkpoints."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, *, prepare_data: bool = True
    ):
        self.config = config
        self.workdir = workdir
        self.num_shards = config_lib.validate_layout(
            config, num_devices=jax.device_count(), num_processes=jax.process_count()
        )
        self.layout = input_pipeline.Layout(
            self.num_shards, jax.process_index(), jax.process_count()
        )
        self.spec = datasets.get_dataset_spec(config.data.name, config)
        self.num_classes = self.spec.num_classes
        self.parallel = parallel.create_parallel(config)
        # The model and the compiled steps, as `--mode=compile` compiles them for a target;
        # their loss reads the training split's class counts first if it needs them
        # (class_balanced; `objectives.resolve_class_counts`).
        program_config = config
        if prepare_data:
            program_config = objectives.resolve_class_counts(config, self._train_class_index)
        self.programs = programs.Programs(program_config, self.spec, self.parallel)
        self._eval_geometry: dict[str, input_pipeline.EvalGeometry] = {}
        # {split: figures} of the state the last `train()` returned, evaluated at the run's
        # last step; `report` takes them instead of evaluating the split again.
        self.final_evaluation: dict[str, dict] = {}
        self.manager = checkpointing.create_checkpoint_manager(
            os.path.join(workdir, "checkpoints"), config.keep_checkpoints
        )
        self.is_main = jax.process_index() == 0
        # Fail fast, before any data preparation: the weights must exist and fit the model.
        self.backbone = None
        if config.model.pretrained and self.manager.latest_step() is None:
            abstract = self.programs.abstract_state
            segformer = models.is_segformer(config.model.name)
            loader = pretrained_segformer if segformer else pretrained
            self.backbone = loader.load_for_model(
                config.model.pretrained,
                {"params": abstract.params, "batch_stats": abstract.batch_stats},
                model=config.model.name,
            )
        if prepare_data:  # now, before anything is compiled; else on first use
            _ = self.data

    @functools.cached_property
    def data(self) -> input_pipeline.Dataset:
        """The prepared dataset of `config.data.name` as this process reads it (prediction on
        image files uses none: `Trainer(..., prepare_data=False)`)."""
        return input_pipeline.Dataset.load(self.config, self.layout)

    def _train_class_index(self):
        split = self.config.data.train_split
        return class_index.get_class_index(self.data.builder, self.spec, split)

    # -- state -----------------------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """The latest checkpoint in the workdir if there is one, else a fresh state (with the
        pretrained backbone of `config.model.pretrained`, if set)."""
        step = self.manager.latest_step()
        if step is None:
            state = self.programs.init(jax.random.key(self.config.seed), self.backbone)
            return self.parallel.device_state(state)
        if self.is_main:
            print(f"Resuming from the checkpoint of step {step} in {self.workdir}", flush=True)
        return self.restore(step)

    def restore(self, step: int) -> TrainState:
        """The verified state of `step` (see `checkpointing.restore_checkpoint`)."""
        restored = checkpointing.restore_checkpoint(
            self.manager, step, self.parallel.abstract_state(self.programs.abstract_state)
        )
        return self.parallel.device_state(restored)

    def save(self, state: TrainState, step: int, eval_figures: dict | None) -> None:
        """Starts saving `state` with its validation mIoU, if it was evaluated (for "best").

        A state with NaN or inf in it is never saved: Diverged is raised instead.
        """
        checkpoint_metrics = None
        if eval_figures:
            checkpoint_metrics = {checkpointing.BEST_METRIC: float(eval_figures["miou"])}
        try:
            checkpointing.save_checkpoint(
                self.manager, step, self.parallel.host_state(state), checkpoint_metrics
            )
        except checkpointing.NonFiniteStateError as e:
            raise self._diverged(step, f"the state has NaN/inf in {e.leaves[0]}") from None

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, state: TrainState, split: str) -> dict:
        """The figures of docs/maths.md ("Metrics") over the whole split (every example once,
        padding masked), with predictions at the label maps' resolution."""
        if split not in self._eval_geometry:
            self._eval_geometry[split] = self.data.eval_geometry(split)
        geometry = self._eval_geometry[split]
        step_fn = self.programs.eval_step(geometry)
        evaluation = train_metrics.Evaluation.empty(self.num_classes)
        for batch in self.data.eval_iterator(split, geometry):
            outputs = self.parallel.fetch(step_fn(state, self.parallel.put_batch(batch)))
            evaluation = evaluation.merge(
                train_metrics.Evaluation.single_from_model_output(**outputs)
            )
        return evaluation.compute()

    # -- training --------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Trains from the workdir's latest checkpoint (or afresh) to `num_train_steps`.

        A step's figures are fetched and checked (NaN or inf: `Diverged`) while the next step
        runs; `_Due` says what else a step calls for.
        """
        config = self.config
        self.final_evaluation = {}
        # -- Start: the latest checkpoint (the run then continues exactly) or a fresh state --
        state = self.initial_state()
        start = self.parallel.current_step(state)
        sampler = self._start_sampler(state, start)
        data = self.data.train_iterator(start_step=start, index_fn=sampler)
        # -- Logs: TensorBoard (and the hyper-parameters of a fresh run), progress, profile --
        writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_main)
        if start == 0 and self.is_main:
            writer.write_hparams(_hparams(config))
        progress = _ReportProgress(
            num_train_steps=config.num_train_steps,
            writer=writer,
            every_steps=config.log_every_steps,
            every_secs=None,
        )
        progress(start)  # the clock starts now (clu reports from the following calls on)
        profiler = profiling.StepProfiler(
            self.workdir, config.profile_steps, start_step=start, enabled=self.is_main
        )
        figures = None  # the train figures since the last log step, merged (a clu Collection)
        unchecked = None  # (step, figures on the device) of a step not yet checked
        try:
            with checkpointing.StopRequests(self.manager) as stop:
                for step in range(start + 1, config.num_train_steps + 1):
                    # -- A step; the previous one is checked while this one runs --
                    state, step_figures = self.programs.train(
                        state, self.parallel.put_batch(next(data))
                    )
                    profiler(step, state)
                    progress(step)
                    if unchecked is not None:
                        figures = _merged(figures, self._checked(*unchecked))
                    unchecked = (step, step_figures)
                    due = _Due.at(step, config, sampler, stop.requested(step))
                    if not due:
                        continue
                    # -- What is due, once the step is checked (before anything reads it) --
                    figures = _merged(figures, self._checked(*unchecked))
                    unchecked = None
                    if due.refresh:
                        sampler.after_step(
                            step, functools.partial(self.parallel.fetch, state.sampling_probs)
                        )
                    if due.log:
                        self._write_train(writer, step, figures.compute(), progress.steps_per_sec)
                        figures = None
                    eval_figures = None
                    if due.evaluate:
                        eval_figures = self.evaluate(state, config.data.eval_split)
                        self._write_eval(writer, step, config.data.eval_split, eval_figures)
                        if step == config.num_train_steps:
                            self.final_evaluation = {config.data.eval_split: eval_figures}
                    if due.save or due.stop:
                        self.save(state, step, eval_figures)
                    if due.stop:
                        self.manager.wait_until_finished()
                        raise checkpointing.Preempted(
                            f"stopped at step {step} by {stop.reason}; checkpoint saved; "
                            "rerun the same command to resume",
                            stop.exit_code,
                        )
                profiler.close(state)
        except BaseException:
            # Let a save in flight finish (only checked states are saved) and stop Orbax's
            # threads, so that the error is the last thing printed.
            self.manager.close()
            raise
        finally:
            if sampler is not None:
                sampler.close()  # the reader may be waiting for a period beyond the last step
            data.close()  # release the tf.data iterator now, not during interpreter shutdown
        self.manager.wait_until_finished()
        writer.flush()
        return state

    def _start_sampler(self, state: TrainState, start: int):
        """Tilted class-aware sampling's `IndexFn`, started from the (restored) state; None
        for the samplers that need no training state (`Dataset.fixed_sampler`)."""
        if sampling.method(self.config.data) != "tilted":
            return None
        sampler = self.data.class_aware_sampler()
        sampler.start(start, self.parallel.fetch(state.sampling_probs))
        return sampler

    def _checked(self, step: int, step_figures):
        """The figures of `step` fetched to the host; raises Diverged if its loss or gradient
        norm is NaN or infinite."""
        fetched = self.parallel.fetch(step_figures)
        values = fetched.compute()
        for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
            value = np.asarray(values[key], np.float64)
            if not np.isfinite(value).all():
                raise self._diverged(step, f"{name} is {value[~np.isfinite(value)][0]}")
        return fetched

    def _diverged(self, step: int, problem: str) -> checkpointing.Diverged:
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        if good is None:
            where, fix = "no checkpoint yet", "rerun to start afresh"
        else:
            where = f"last good checkpoint: step {good} in {self.manager.directory}"
            fix = f"rerun to resume from step {good}"
        lr = self.config.optimizer.learning_rate
        return checkpointing.Diverged(
            f"{problem} at step {step}; nothing saved after step {step - 1} ({where}); "
            f"lower the learning rate (--config.optimizer.learning_rate, now {lr:g}) and {fix}, "
            "or use a new --workdir"
        )

    def _write_train(self, writer, step: int, figures: dict, steps_per_sec: float) -> None:
        """The train figures averaged since the last log step: TensorBoard, train_metrics.jsonl
        and a progress line."""
        if not self.is_main:
            return
        config = self.config
        scalars = train_metrics.train_scalars(figures, self.spec.class_names)
        writer.write_scalars(step, scalars)
        workdir_lib.append_jsonl(
            os.path.join(self.workdir, workdir_lib.TRAIN_METRICS_FILE), {"step": step, **scalars}
        )
        eta = (config.num_train_steps - step) / steps_per_sec
        print(
            f"[{config.loss.name}] step {step}/{config.num_train_steps}  "
            f"loss {scalars['train/loss']:.4f}  {steps_per_sec:.2f} steps/s  "
            f"ETA {train_metrics.format_duration(eta)}",
            flush=True,
        )

    def _write_eval(self, writer, step: int, split: str, figures: dict) -> None:
        flat = metrics.flatten_figures(figures, self.spec.class_names)
        if self.is_main:
            writer.write_scalars(step, {f"{split}/{k}": v for k, v in flat.items()})
            workdir_lib.append_jsonl(
                os.path.join(self.workdir, "metrics.jsonl"), {"step": step, "split": split, **flat}
            )
            print(
                f"  eval {split} @ step {step}: mIoU {100 * flat['miou']:.1f}  "
                f"worst-class IoU {100 * flat['worst_iou']:.1f}  "
                f"pixel acc {100 * flat['pixel_accuracy']:.1f}  "
                f"mIoU^I {100 * flat['image_miou']:.1f}  mIoU^C {100 * flat['class_miou']:.1f}",
                flush=True,
            )

    # -- final reports ---------------------------------------------------------------------

    def report(self, state: TrainState, splits, evaluated=None) -> dict[str, dict]:
        """Evaluates `splits` and writes report.md / per_class.csv / final_metrics.json.
        `evaluated`: {split: figures} already computed for `state`, not evaluated again."""
        evaluated = evaluated or {}
        results = {}
        for split in splits:
            if split not in self.data.split_names:
                logging.warning("Split %r does not exist; not reported.", split)
                continue
            results[split] = evaluated[split] if split in evaluated else self.evaluate(state, split)
        if self.is_main and results:
            config = self.config
            metrics.write_run_reports(
                self.workdir,
                results,
                self.spec.class_names,
                title=f"{config.loss.name} on {config.data.name}",
                extra={
                    "loss": config.loss.name,
                    "t": config.loss.t,
                    "step": self.parallel.current_step(state),
                },
            )
        return results


@dataclasses.dataclass(frozen=True)
class _Due:
    """What is due after a training step (all false on most steps)."""

    refresh: bool  # class-sampling probabilities of the next period
    log: bool
    evaluate: bool
    save: bool
    stop: bool  # a signal asked the run to stop

    @classmethod
    def at(cls, step: int, config, sampler, stop: bool) -> _Due:
        last = step == config.num_train_steps
        evaluate = step % config.eval_every_steps == 0 or last
        return cls(
            refresh=sampler is not None and sampler.refresh_due(step),
            log=step % config.log_every_steps == 0 or last,
            evaluate=evaluate,
            # An evaluated state is saved too, so that "best" can be any evaluated one.
            save=step % config.checkpoint_every_steps == 0 or last or evaluate,
            stop=stop,
        )

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))


class _ReportProgress(periodic_actions.ReportProgress):
    """clu's progress report (steps/s and uptime to TensorBoard, the ETA in the work unit's
    notes), keeping the rate it last reported for the printed progress line."""

    steps_per_sec = float("nan")

    def _apply(self, step: int, t: float) -> None:
        self.steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
        super()._apply(step, t)


def _merged(total, update):
    """Collection `update` merged into `total` (None: nothing yet)."""
    return update if total is None else total.merge(update)


def _hparams(config: ml_collections.ConfigDict) -> dict:
    """The config as TensorBoard's hyper-parameters: dotted names, values str unless scalar."""
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, dict]:
    """Trains (resuming from the workdir's latest checkpoint), then evaluates and reports.

    `workdir` is a local path or a `gs://` path (`tce_jax.workdir.resolve`). The run holds the
    workdir's lock, refuses to resume a checkpoint of a different experiment unless
    `allow_config_change`, and records config.json and provenance.jsonl (`tce_jax.workdir`).
    Returns the final figures per split of `config.data.final_eval_splits`. `config` is taken
    as checked (`tce_jax.startup.start`).
    """
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lib.open_run(config, workdir, allow_config_change=allow_config_change):
        trainer = Trainer(config, workdir)
        state = trainer.train()
        splits = tuple(config.data.final_eval_splits)
        results = trainer.report(state, splits, evaluated=trainer.final_evaluation)
        trainer.manager.close()
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "best"):
    """Evaluates a checkpoint of the workdir and reports.

    `checkpoint`: "best" (the highest validation mIoU among the evaluated checkpoints),
    "latest", or a step number.
    """
    with workdir_lib.open_run(config, workdir, mode="evaluate", details={"checkpoint": checkpoint}):
        return _evaluate(config, workdir, checkpoint)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str):
    trainer = Trainer(config, workdir)
    manager = trainer.manager
    try:
        step = _checkpoint_step(manager, checkpoint)
        if trainer.is_main:
            print(f"Evaluating the checkpoint of step {step} ({checkpoint})", flush=True)
        state = trainer.restore(step)
        results = trainer.report(state, tuple(config.data.final_eval_splits))
    finally:
        manager.close()
    return results


def _checkpoint_step(manager, checkpoint: str) -> int:
    steps = list(manager.all_steps())
    if checkpoint == "best":
        step = manager.best_step()
        if step is None and steps:
            raise FileNotFoundError(
                f"No checkpoint in {manager.directory} was evaluated (steps there: {steps}), so "
                "none is 'best'. Pass --checkpoint=latest or a step number."
            )
    elif checkpoint == "latest":
        step = manager.latest_step()
    else:
        step = int(checkpoint) if checkpoint.isdigit() else None
    if step is None or step not in steps:
        raise FileNotFoundError(
            f"No checkpoint {checkpoint!r} in {manager.directory} (steps there: {steps}). "
            "Train first, or pass --checkpoint=latest|best|STEP."
        )
    return step
