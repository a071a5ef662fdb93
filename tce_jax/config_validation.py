"""Config validation: every field the trainer reads is checked here, once, before any data is
read or anything compiled (`startup.start` calls `validate_config`); a bad value is a
`ConfigError` whose one line names the field and the fix. The fields and their defaults are in
`tce_jax.config_lib`, which re-exports these checks."""

import difflib
import math

import ml_collections

from tce_jax import losses, objectives, sampling
from tce_jax.objectives import LOSSES, parse_class_counts, parse_class_weights

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
PARALLELISM = ("jit", "pmap")
DISTRIBUTED_MODES = ("auto", "on", "off")
EVAL_MODES = ("whole", "sliding")
SAMPLING_PRIORS = ("uniform", "loss")


class ConfigError(ValueError):
    """A config field has a value the trainer cannot use; the message names the field."""


def _check(condition: bool, field: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(
            f"config.{field}={value!r} is invalid: expected {expected}. "
            f"Fix it in the config file or with --config.{field}=..."
        )


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_field_message(config: ml_collections.ConfigDict, field: str) -> str | None:
    """A one-line error if the dotted `field` (e.g. "loss.tt") is not in `config`, else None."""
    node, parts = config, field.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            parent = ".".join(["config", *parts[:depth]])
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{field}: {parent} is a value, not a group of fields."
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean --config.{'.'.join([*parts[:depth], close[0]])}?"
            else:
                hint = f"its fields are: {', '.join(keys)}."
            return f"--config.{field}: {parent} has no field {part!r}; {hint}"
        node = node[part]
    return None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field the trainer reads, before any data is read or anything compiled."""
    # Flax's import: a third of a second, no device set-up.
    from tce_jax.models import MODELS, head_modules, is_deeplab, is_segformer

    validate_folder_config(config)
    model_names = tuple(MODELS)
    _check(
        config.model.name in model_names,
        "model.name",
        config.model.name,
        f"one of {model_names}{did_you_mean(config.model.name, model_names)}",
    )
    _check(
        config.loss.name in LOSSES,
        "loss.name",
        config.loss.name,
        f"one of {LOSSES}{did_you_mean(config.loss.name, LOSSES)}",
    )
    for field in ("t", "tau"):
        value = config.loss[field]
        _check(
            isinstance(value, int | float) and math.isfinite(value),
            f"loss.{field}",
            value,
            "a finite number",
        )
    _check(0.0 < config.loss.lam <= 1.0, "loss.lam", config.loss.lam, "a number in (0, 1]")
    _check(
        config.loss.class_weighting in ("frequency", "uniform"),
        "loss.class_weighting",
        config.loss.class_weighting,
        "'frequency' or 'uniform'",
    )
    for field, choices in (
        ("estimator", losses.ESTIMATORS),
        ("batch_loss", losses.BATCH_LOSSES),
    ):
        _check(
            config.loss[field] in choices,
            f"loss.{field}",
            config.loss[field],
            f"one of {choices}",
        )
    _check(
        isinstance(config.loss.focal_gamma, int | float) and config.loss.focal_gamma >= 0,
        "loss.focal_gamma",
        config.loss.focal_gamma,
        "a number >= 0",
    )
    for field, parse in (("class_weights", parse_class_weights), ("cb_counts", parse_class_counts)):
        try:
            parse(config.loss[field])
        except ValueError as e:
            raise ConfigError(
                f"{e} Fix it in the config file or with --config.loss.{field}=..."
            ) from None
    beta = config.loss.cb_beta
    _check(
        isinstance(beta, int | float) and 0.0 <= beta <= 1.0,
        "loss.cb_beta",
        beta,
        "a number in [0, 1] (0: uniform weights, 1: inverse frequency; the reference's 0.9999)",
    )
    _validate_ohem_dice(config.loss)
    accum = config.grad_accum_steps
    _check(
        isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1,
        "grad_accum_steps",
        accum,
        "an integer >= 1",
    )
    _check(
        accum == 1 or objectives.supports_accumulation(config.loss.name),
        "grad_accum_steps",
        accum,
        f"1 with loss.name={config.loss.name!r} (not a function of additive batch statistics: "
        "no exact accumulation)",
    )
    _check(
        isinstance(config.profile_steps, int) and config.profile_steps >= 0,
        "profile_steps",
        config.profile_steps,
        "an integer >= 0 (0 = no profiling)",
    )
    opt = config.optimizer
    _check(opt.name in OPTIMIZERS, "optimizer.name", opt.name, f"one of {OPTIMIZERS}")
    _check(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"one of {SCHEDULES}")
    _check(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "a number > 0")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "a number >= 0")
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "an integer >= 0")
    head_lr = opt.head_lr_multiplier
    _check(head_lr > 0, "optimizer.head_lr_multiplier", head_lr, "a number > 0")
    _check(
        head_lr == 1.0 or bool(head_modules(config.model.name)),
        "optimizer.head_lr_multiplier",
        head_lr,
        f"1.0 with model.name={config.model.name!r} (it has no decode head)",
    )
    _check(
        config.parallelism in PARALLELISM,
        "parallelism",
        config.parallelism,
        f"one of {PARALLELISM}",
    )
    _check(
        config.distributed.mode in DISTRIBUTED_MODES,
        "distributed.mode",
        config.distributed.mode,
        f"one of {DISTRIBUTED_MODES}",
    )
    for field in (
        "num_train_steps",
        "global_batch_size",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        _check(config[field] > 0, field, config[field], "an integer > 0")
    data = config.data
    _check(data.eval_batch_size > 0, "data.eval_batch_size", data.eval_batch_size, "an integer > 0")
    _check(
        len(data.crop_size) == 2 and all(s > 0 for s in data.crop_size),
        "data.crop_size",
        data.crop_size,
        "(height, width) with positive sizes",
    )
    _check(
        0 < data.min_scale <= data.max_scale,
        "data.min_scale/max_scale",
        (data.min_scale, data.max_scale),
        "0 < min_scale <= max_scale",
    )
    _check(
        len(data.base_size) == 0
        or (len(data.base_size) == 2 and 0 < data.base_size[0] <= data.base_size[1]),
        "data.base_size",
        data.base_size,
        "() or (short, long) with 0 < short <= long",
    )
    _check(data.eval_mode in EVAL_MODES, "data.eval_mode", data.eval_mode, f"one of {EVAL_MODES}")
    for field in ("eval_window", "eval_stride"):
        _check(
            len(data[field]) == 2 and all(s > 0 for s in data[field]),
            f"data.{field}",
            data[field],
            "(height, width) with positive sizes",
        )
    _check(
        len(data.eval_canvas) == 0
        or (len(data.eval_canvas) == 2 and all(s > 0 for s in data.eval_canvas)),
        "data.eval_canvas",
        data.eval_canvas,
        "() (automatic) or (height, width) with positive sizes",
    )
    _validate_tta(data)
    _check(data.num_shards >= 0, "data.num_shards", data.num_shards, "an integer >= 0")
    _check(
        0.0 <= data.sampling_mix <= 1.0,
        "data.sampling_mix",
        data.sampling_mix,
        "a number in [0, 1]",
    )
    _check(
        data.sampling_refresh_steps > 0,
        "data.sampling_refresh_steps",
        data.sampling_refresh_steps,
        "an integer > 0",
    )
    _check(
        data.sampling_prior in SAMPLING_PRIORS,
        "data.sampling_prior",
        data.sampling_prior,
        f"one of {SAMPLING_PRIORS}",
    )
    _validate_sampling(config)
    _check(
        not config.model.pretrained
        or is_deeplab(config.model.name)
        or is_segformer(config.model.name),
        "model.pretrained",
        config.model.pretrained,
        "'' unless model.name is a DeepLabV3+ or a SegFormer (only the ResNet backbone or the "
        "MiT encoder is pretrained)",
    )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_ohem_dice(loss: ml_collections.ConfigDict) -> None:
    """The fields of `ohem` and `dice` (`tce_jax.losses.ohem_cross_entropy`, `dice_loss`)."""
    thresh, min_kept = loss.ohem_thresh, loss.ohem_min_kept
    _check(
        _is_number(thresh) and 0 <= thresh <= 1, "loss.ohem_thresh", thresh, "a number in [0, 1]"
    )
    _check(
        isinstance(min_kept, int) and not isinstance(min_kept, bool) and min_kept >= 0,
        "loss.ohem_min_kept",
        min_kept,
        "an integer >= 0 (pixels kept per image)",
    )
    smooth, exponent = loss.dice_smooth, loss.dice_exponent
    _check(_is_number(smooth) and smooth >= 0, "loss.dice_smooth", smooth, "a number >= 0")
    _check(_is_number(exponent) and exponent >= 1, "loss.dice_exponent", exponent, "a number >= 1")


def _validate_sampling(config: ml_collections.ConfigDict) -> None:
    """The sampler's fields (`tce_jax.sampling`)."""
    data = config.data
    samplings = sampling.SAMPLINGS
    _check(data.sampling in samplings, "data.sampling", data.sampling, f"one of {samplings}")
    _check(
        not data.class_aware_sampling or data.sampling in ("uniform", "tilted"),
        "data.class_aware_sampling",
        data.class_aware_sampling,
        f"False with data.sampling={data.sampling!r} (True means data.sampling='tilted')",
    )
    tilted = sampling.method(data) == "tilted"
    field, value, other = ("class_aware_sampling", True, "False")
    if not data.class_aware_sampling:
        field, value, other = ("sampling", data.sampling, "another sampler")
    _check(
        not tilted or config.loss.name == "stochastic_tce",
        f"data.{field}",
        value,
        f"{other} unless loss.name='stochastic_tce' (the sampler reads its running weights)",
    )
    _check(
        config.loss.batch_loss == "tilted" or tilted,
        "loss.batch_loss",
        config.loss.batch_loss,
        "'tilted' unless data.class_aware_sampling=True or data.sampling='tilted' (plain CE over "
        "batches drawn otherwise would not tilt at all)",
    )
    for field, positive in (
        ("rcs_temperature", True),
        ("rcs_min_pixels", False),
        ("rcs_min_crop_ratio", False),
        ("repeat_factor_threshold", True),
    ):
        value = data[field]
        _check(
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0),
            f"data.{field}",
            value,
            "a finite number > 0" if positive else "a finite number >= 0",
        )


def _validate_tta(data: ml_collections.ConfigDict) -> None:
    """Test-time augmentation fields (see `tce_jax.inference.tta_probabilities`)."""
    _check(isinstance(data.tta_flip, bool), "data.tta_flip", data.tta_flip, "True or False")
    scales = data.tta_scales
    _check(
        isinstance(scales, tuple | list)
        and len(scales) > 0
        and all(isinstance(s, int | float) and math.isfinite(s) and s > 0 for s in scales),
        "data.tta_scales",
        scales,
        "a non-empty tuple of positive numbers, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)",
    )


def validate_layout(
    config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int
) -> int:
    """Checks that the batches split over devices and data shards; returns the shard count."""
    num_shards = config.data.num_shards or num_processes
    for field, batch in (
        ("global_batch_size", config.global_batch_size),
        ("data.eval_batch_size", config.data.eval_batch_size),
    ):
        _check(
            batch % num_devices == 0,
            field,
            batch,
            f"a multiple of the number of devices ({num_devices})",
        )
    accum = config.grad_accum_steps
    _check(
        config.global_batch_size % (num_devices * accum) == 0,
        "grad_accum_steps",
        accum,
        f"a divisor of the per-device batch ({config.global_batch_size} / {num_devices} devices)",
    )
    _check(
        num_shards % num_processes == 0,
        "data.num_shards",
        config.data.num_shards,
        f"0 or a multiple of the number of processes ({num_processes})",
    )
    _check(
        config.global_batch_size % num_shards == 0,
        "global_batch_size",
        config.global_batch_size,
        f"a multiple of data.num_shards ({num_shards})",
    )
    return num_shards


def validate_folder_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.data.folder`` when ``data.name`` is ``folder`` (the folder itself is
    checked when its spec is built: tce_jax.datasets.folder)."""
    if config.data.name != "folder":
        return
    folder = config.data.folder  # an empty root fails when the spec is built, naming the field
    for field in ("img_suffix", "seg_map_suffix"):
        _check(bool(folder[field]), f"data.folder.{field}", folder[field], "a file-name ending")
    _check(
        not (folder.label_map and folder.reduce_zero_label),
        "data.folder.label_map",
        folder.label_map,
        "'' when data.folder.reduce_zero_label=True (both map label values: keep one)",
    )
