"""Config schema shared by every file in `configs/`: the fields, their defaults, the variants
(`:ce`, `:tiny`, ...) and the validation that runs before anything is compiled."""

import difflib
import math

import ml_collections

from tce_jax import device_transforms, losses, objectives
from tce_jax.objectives import LOSSES, parse_class_weights


def get_base_config() -> ml_collections.ConfigDict:
    """The fields every config has, with the embedded-dataset defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "street_scenes"  # a key of tce_jax.datasets registry
    config.data.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    config.data.manual_dir = ""  # where the user put the official archives (real datasets)
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # periodic evaluation and best-checkpoint selection
    config.data.final_eval_splits = ("validation", "test")  # evaluated and reported at the end
    config.data.crop_size = (64, 128)  # (H, W) of training crops
    config.data.min_scale = 0.75  # random resize ratio range before cropping
    config.data.max_scale = 1.5
    # (short, long): first rescale each image, keeping its aspect ratio, to fit this size
    # (mmsegmentation's `scale`), both for training (before the random ratio) and evaluation.
    # () = keep the native size.
    config.data.base_size = ()
    config.data.flip = True
    config.data.photometric = False  # brightness/contrast/saturation/hue jitter
    config.data.mean = device_transforms.IMAGENET_MEAN  # ImageNet normalisation, images in [0, 1]
    config.data.std = device_transforms.IMAGENET_STD
    # Number of data shards the global batch is drawn from. 0 = one per process. The global
    # batch is a deterministic function of (seed, num_shards) alone, so runs with the same
    # num_shards see identical data whatever their process count.
    config.data.num_shards = 0
    config.data.eval_batch_size = 16  # global
    # Evaluation: whole images, or sliding windows of eval_window (H, W) every eval_stride;
    # predictions are resized back to each label map's resolution. Images are padded into
    # eval_canvas (H, W); () = the smallest one (a multiple of 32 if sizes vary) that holds
    # every (rescaled) image of the split.
    config.data.eval_mode = "whole"  # whole | sliding
    config.data.eval_window = (512, 512)
    config.data.eval_stride = (341, 341)
    config.data.eval_canvas = ()
    # Test-time augmentation for evaluation and prediction (mmsegmentation's aug-test): the
    # mean softmax probabilities over these image scales and, with tta_flip, their mirror
    # images. (1.0,) and False: none.
    config.data.tta_flip = False
    config.data.tta_scales = (1.0,)
    config.data.prefetch = 2
    # Tilted class-aware sampling (Stochastic TCE; docs/maths.md).
    config.data.class_aware_sampling = False
    config.data.sampling_mix = 0.5  # weight of the uniform distribution in the class draw
    config.data.sampling_refresh_steps = 100
    # The class prior of the draw: "uniform" (p_c ~ exp(t R_c): every class by its running loss
    # alone) or "loss" (loss.class_weighting's prior, with which frequent classes dominate the
    # draw as they do the pixels); docs/maths.md.
    config.data.sampling_prior = "uniform"
    config.data.folder = get_folder_fields()  # data.name = "folder": your own dataset

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.output_stride = 16  # DeepLabV3+ only
    config.model.pretrained = ""  # local file with backbone weights (DeepLabV3+, SegFormer)

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "tce"  # ce | tce | stochastic_tce | weighted_ce | focal | lovasz
    config.loss.t = 1.0  # class-level tilt
    config.loss.tau = 0.0  # pixel-level tilt (hierarchical TERM)
    config.loss.class_weighting = "frequency"  # frequency | uniform
    config.loss.lam = 0.1  # Stochastic TCE running-estimate rate
    # Stochastic TCE's running class losses: "ema" (of L_c) or "tilted" (TERM's running average
    # of exp(t L_c), kept in log space).
    config.loss.estimator = "ema"
    # Stochastic TCE's batch loss: "tilted" (weighted by the running tilted weights) or "ce"
    # (plain CE over the batch: with data.class_aware_sampling the sampler carries the tilt).
    config.loss.batch_loss = "tilted"
    # weighted_ce: inverse_frequency | median_frequency | enet (from the global batch's class
    # counts), or one weight per class, comma-separated ("1,2.5,...").
    config.loss.class_weights = "inverse_frequency"
    config.loss.focal_gamma = 2.0  # focal

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # sgd | adamw
    config.optimizer.learning_rate = 3e-3
    config.optimizer.momentum = 0.9  # sgd only
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "poly"  # poly | cosine | constant
    config.optimizer.poly_power = 0.9
    config.optimizer.warmup_steps = 50
    # Learning rate of the model's decode head (models.head_modules) relative to the rest, as
    # mmsegmentation's lr_mult (SegFormer's recipe: 10). 1.0 = one learning rate.
    config.optimizer.head_lr_multiplier = 1.0

    config.global_batch_size = 16
    # Exact gradient accumulation: the global batch runs as this many micro-batches (same loss
    # and gradients, activation memory of a micro-batch; tce_jax.accumulation). Not for lovasz.
    config.grad_accum_steps = 1
    config.num_train_steps = 1200
    config.parallelism = "jit"  # jit (device mesh) | pmap
    config.mixed_precision = False  # bf16 compute, float32 parameters
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.keep_checkpoints = 2  # latest N kept, plus the best by validation mIoU
    # Profile this many steps (after a few warm-up steps) into the TensorBoard log dir (the
    # workdir; Profile tab); 0 = off.
    config.profile_steps = 0
    config.distributed = ml_collections.ConfigDict()
    # jax.distributed: "auto" initialises when the environment asks for it (TPU pod, SLURM,
    # Open MPI, or the coordinator fields below); "on" always; "off" never.
    config.distributed.mode = "auto"
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 0
    config.distributed.process_id = -1
    config.distributed.initialization_timeout = 300  # seconds to wait for every process
    config.distributed.heartbeat_timeout = 100  # seconds before a silent peer ends the job
    return config


# ---------------------------------------------------------------------------------------------
# Folder datasets (config.data.name = "folder", tce_jax/datasets/folder.py, docs/folder_dataset.md).


def get_folder_fields() -> ml_collections.ConfigDict:
    """``config.data.folder``: a folder in mmsegmentation's img_dir/ann_dir layout."""
    folder = ml_collections.ConfigDict()
    # Holds classes.txt, img_dir/{train,val,test} and ann_dir/{train,val,test}.
    folder.root = ""
    folder.img_suffix = ".jpg"  # the image x<img_suffix> pairs with the label map
    folder.seg_map_suffix = ".png"  # x<seg_map_suffix>
    folder.reduce_zero_label = False  # label 0 -> 255 (ignored), k -> k - 1 (mmsegmentation)
    # "raw:train_id,raw:train_id" (values not listed -> 255); overrides <root>/label_map.txt.
    folder.label_map = ""
    return folder


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


# ---------------------------------------------------------------------------------------------


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


def _did_you_mean(word: str, choices) -> str:
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
        f"one of {model_names}{_did_you_mean(config.model.name, model_names)}",
    )
    _check(
        config.loss.name in LOSSES,
        "loss.name",
        config.loss.name,
        f"one of {LOSSES}{_did_you_mean(config.loss.name, LOSSES)}",
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
    try:
        parse_class_weights(config.loss.class_weights)
    except ValueError as e:
        raise ConfigError(
            f"{e} Fix it in the config file or with --config.loss.class_weights=..."
        ) from None
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
        not data.class_aware_sampling or config.loss.name == "stochastic_tce",
        "data.class_aware_sampling",
        data.class_aware_sampling,
        "False unless loss.name='stochastic_tce' (the sampler reads its running weights)",
    )
    _check(
        data.sampling_prior in SAMPLING_PRIORS,
        "data.sampling_prior",
        data.sampling_prior,
        f"one of {SAMPLING_PRIORS}",
    )
    _check(
        config.loss.batch_loss == "tilted" or data.class_aware_sampling,
        "loss.batch_loss",
        config.loss.batch_loss,
        "'tilted' unless data.class_aware_sampling=True (plain CE over uniformly drawn batches "
        "would not tilt at all)",
    )
    _check(
        not config.model.pretrained
        or is_deeplab(config.model.name)
        or is_segformer(config.model.name),
        "model.pretrained",
        config.model.pretrained,
        "'' unless model.name is a DeepLabV3+ or a SegFormer (only the ResNet backbone or the "
        "MiT encoder is pretrained)",
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


def get_recipe_config() -> ml_collections.ConfigDict:
    """The standard DeepLabV3+ recipe of the real-dataset configs (mmsegmentation's R-101-D8).

    SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly decay (power 0.9), no warm-up; random
    resize by a ratio in [0.5, 2.0], crops padded with the ignore label, flip, photometric
    distortion; whole-image evaluation on the validation split. The dataset configs set the
    dataset, sizes, batch and budget.
    """
    config = get_base_config()
    # The test labels of both benchmarks are not public: report validation only.
    config.data.final_eval_splits = ("validation",)
    config.data.min_scale = 0.5
    config.data.max_scale = 2.0
    config.data.flip = True
    config.data.photometric = True
    config.data.eval_mode = "whole"
    config.model.name = "deeplabv3plus_resnet101"
    config.model.output_stride = 8
    opt = config.optimizer
    opt.name, opt.learning_rate, opt.momentum, opt.weight_decay = "sgd", 0.01, 0.9, 5e-4
    opt.schedule, opt.poly_power, opt.warmup_steps = "poly", 0.9, 0
    config.log_every_steps = 50
    return config


# ---------------------------------------------------------------------------------------------
# Variants: `--config=path.py:variant,variant`, the same names for every config file.


def _sampling(config):
    config.data.class_aware_sampling = True


def _backbone(depth: int):
    def apply(config):
        config.model.name = f"deeplabv3plus_resnet{depth}"

    return apply


def _bf16(config):
    config.mixed_precision = True


def _slide(config):
    config.data.eval_mode = "sliding"


def _tta(config):  # mmsegmentation's aug-test ratios, with flip
    config.data.tta_scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    config.data.tta_flip = True


SEGFORMERS = tuple(f"segformer_b{size}" for size in range(6))  # variant = model name


def _segformer(name: str):
    def apply(config):
        """mmsegmentation's SegFormer schedule (segformer_mit-b*_8xb*-160k_*.py), for
        ImageNet-pretrained MiT encoders: AdamW lr 6e-5, weight decay 0.01 (none on norms and
        biases), the decode head at 10x, linear warm-up over 1500 steps, then poly decay with
        power 1.0. The dataset configs set the crops, batch, evaluation and budget."""
        config.model.name = name
        opt = config.optimizer
        opt.name, opt.learning_rate, opt.weight_decay = "adamw", 6e-5, 0.01
        opt.head_lr_multiplier, opt.warmup_steps = 10.0, 1500
        opt.schedule, opt.poly_power = "poly", 1.0

    return apply


def has_segformer_variant(arg: str | None) -> bool:
    """Whether the variants `arg` choose a SegFormer recipe (`SEGFORMERS`)."""
    return bool(set(SEGFORMERS) & set((arg or "").split(",")))


# name -> what it sets; the loss names (LOSSES) set config.loss.name, and `tiny` is below.
VARIANTS = {
    "sampling": _sampling,  # tilted class-aware sampling (with stochastic_tce)
    "r50": _backbone(50),
    "r101": _backbone(101),
    "bf16": _bf16,  # bfloat16 compute, float32 parameters
    "slide": _slide,  # sliding-window evaluation
    "tta": _tta,  # test-time augmentation: flip and scales 0.5 to 1.75
    **{name: _segformer(name) for name in SEGFORMERS},  # SegFormer-B0 ... B5 and their schedule
}
TINY = ("tiny", "runlocal")  # `runlocal`: the name the real-dataset configs also accept


def _tiny(config, tiny_data: dict) -> None:
    """A few steps of a small U-Net (of SegFormer-B0 if a SegFormer was chosen) on small crops:
    smoke runs and tests (checkpoints at steps 3 and 6). `tiny_data`: the config file's small
    sizes (data fields) for its dataset."""
    for field, value in tiny_data.items():
        config.data[field] = value
    config.model.name = SEGFORMERS[0] if config.model.name in SEGFORMERS else "unet_small"
    config.global_batch_size = config.data.eval_batch_size = 8
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = config.checkpoint_every_steps = 3
    config.optimizer.warmup_steps = 1
    config.data.sampling_refresh_steps = 2


def apply_variants(
    config: ml_collections.ConfigDict, arg: str | None, *, tiny_data: dict
) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants of `arg`: a loss name (`LOSSES`), any of
    `VARIANTS`, and `tiny` (applied last, whatever the order)."""
    variants = [v for v in (arg or "").split(",") if v]
    for variant in variants:
        if variant in LOSSES:
            config.loss.name = variant
        elif variant in VARIANTS:
            VARIANTS[variant](config)
        elif variant not in TINY:
            known = (*LOSSES, *VARIANTS, "tiny")
            raise ValueError(
                f"Unknown config variant {variant!r}{_did_you_mean(variant, known)}; use any "
                f"of {', '.join(known)}, comma-separated."
            )
    if set(TINY) & set(variants):
        _tiny(config, tiny_data)
    return config
