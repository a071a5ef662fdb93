"""Config schema shared by every file in `configs/`: the fields, their defaults and the variants
(`:ce`, `:tiny`, ...). The checks that run before anything is compiled are in
`tce_jax.config_validation` (re-exported here: `config_lib.validate_config`)."""

import ml_collections

from tce_jax import device_transforms
from tce_jax.config_validation import (  # noqa: F401  (re-exported: the config's API)
    ConfigError,
    did_you_mean,
    unknown_field_message,
    validate_config,
    validate_folder_config,
    validate_layout,
)
from tce_jax.objectives import LOSSES


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
    # The sampler (tce_jax.sampling, docs/comparison.md): "uniform" (shuffled epochs), "tilted"
    # (the same as class_aware_sampling=True), "rcs" (DAFormer's Rare Class Sampling) or
    # "repeat_factor" (LVIS's repeat-factor sampling).
    config.data.sampling = "uniform"
    config.data.rcs_temperature = 0.01  # T of P(c) = softmax((1 - f_c) / T)
    # rcs: an image must hold more than rcs_min_pixels pixels of the drawn class, its crop more
    # than rcs_min_pixels * rcs_min_crop_ratio (0 = no re-crop); both for a 512x512 crop, scaled
    # by the crop's area (sampling.rcs_min_pixels).
    config.data.rcs_min_pixels = 3000
    config.data.rcs_min_crop_ratio = 0.5
    config.data.repeat_factor_threshold = 0.001  # t of r_i = max_c max(1, sqrt(t / f_c))
    config.data.folder = get_folder_fields()  # data.name = "folder": your own dataset

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.output_stride = 16  # DeepLabV3+ only
    config.model.pretrained = ""  # local file with backbone weights (DeepLabV3+, SegFormer)

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "tce"  # a name of tce_jax.objectives.LOSSES
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
    # class_balanced (Cui et al.): weights (1 - beta) / (1 - beta^n_c) from the counts n_c of
    # cb_counts: "images" (training images containing each class), "pixels" (its pixels; any
    # beta < 1 - 1e-8 then gives uniform weights), or one count per class, comma-separated.
    config.loss.cb_beta = 0.9999
    config.loss.cb_counts = "images"
    # ohem (docs/comparison.md): min_kept is per image; mmsegmentation's 100000 per 512x1024
    # crop (get_recipe_config), here the same share of a 64x128 crop.
    config.loss.ohem_thresh = 0.7
    config.loss.ohem_min_kept = 100_000 * 64 * 128 // (512 * 1024)
    config.loss.dice_smooth = 1.0  # dice (mmsegmentation 0.x's smooth and exponent)
    config.loss.dice_exponent = 2.0

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
    # and gradients, activation memory of a micro-batch; tce_jax.accumulation). Not for lovasz
    # or ohem.
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
    config.loss.ohem_min_kept = 100_000  # mmsegmentation's OHEMPixelSampler, per image
    config.log_every_steps = 50
    return config


# ---------------------------------------------------------------------------------------------
# Variants: `--config=path.py:variant,variant`, the same names for every config file.


def _sampling(config):
    config.data.class_aware_sampling = True


def _sampler(name: str):
    def apply(config):
        config.data.sampling = name

    return apply


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
    "rcs": _sampler("rcs"),  # DAFormer's Rare Class Sampling
    "repeat_factor": _sampler("repeat_factor"),  # LVIS's repeat-factor sampling
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
                f"Unknown config variant {variant!r}{did_you_mean(variant, known)}; use any "
                f"of {', '.join(known)}, comma-separated."
            )
    if set(TINY) & set(variants):
        _tiny(config, tiny_data)
    return config
