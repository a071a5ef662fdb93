"""ADE20K (150 classes, ADEChallengeData2016): DeepLabV3+ in the standard 160k setting.

Needs ``ADEChallengeData2016.zip`` in the manual directory (see docs/datasets.md); the first
run prepares our TFDS ``ade20k`` dataset from it::

    python -m tce_jax.main --config=configs/ade20k.py:tce --workdir=workdirs/ade_tce \
        --config.data.manual_dir=/data/ade20k_zip \
        --config.model.pretrained=/data/weights/resnet101.npz

Variants, after a colon, comma-separated:

* ``ce``, ``tce``, ``stochastic_tce``: the loss (default ``tce``);
* ``sampling``: tilted class-aware sampling (with ``stochastic_tce``);
* ``r50`` / ``r101``: the backbone (default ResNet-101), output stride 8;
* ``bf16``: bfloat16 compute (parameters stay float32);
* ``slide``: sliding-window evaluation (512x512 windows, stride 341) instead of whole images;
* ``runlocal`` (alias ``tiny``): a few steps on tiny crops with a small U-Net, for smoke tests.

The recipe (mmsegmentation's DeepLabV3+ R-101-D8 512x512 160k): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, poly decay (power 0.9), global batch 16; images rescaled to fit
(short side 512, long side 2048), then by a random ratio in [0.5, 2.0], 512x512 crops padded
with the ignore label, horizontal flip, photometric distortion; evaluation on the validation
split at the same scale, with predictions resized back to each annotation's resolution.
"""

from tce_jax import config_lib

VARIANTS = (
    "",
    "ce",
    "tce",
    "stochastic_tce,sampling",
    "r50,bf16,slide",
    "runlocal",
    "stochastic_tce,sampling,slide,runlocal",
)


def get_config(arg: str | None = None):
    config = config_lib.get_base_config()
    config.data.name = "ade20k"
    config.data.eval_split = "validation"
    config.data.final_eval_splits = ("validation",)  # the test images have no public labels
    config.data.crop_size = (512, 512)
    config.data.base_size = (512, 2048)  # (short, long) side before the random ratio
    config.data.min_scale = 0.5
    config.data.max_scale = 2.0
    config.data.flip = True
    config.data.photometric = True
    config.data.eval_batch_size = 16
    config.data.eval_mode = "whole"
    config.data.eval_window = (512, 512)
    config.data.eval_stride = (341, 341)

    config.model.name = "deeplabv3plus_resnet101"
    config.model.output_stride = 8

    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.optimizer.schedule = "poly"
    config.optimizer.poly_power = 0.9
    config.optimizer.warmup_steps = 0

    config.global_batch_size = 16
    config.num_train_steps = 160_000
    config.log_every_steps = 50
    config.eval_every_steps = 16_000
    config.checkpoint_every_steps = 8_000
    return apply_variants(config, arg)


def apply_variants(config, arg: str | None):
    loss_variants = []
    for variant in filter(None, (arg or "").split(",")):
        if variant in config_lib.LOSSES:
            loss_variants.append(variant)
        elif variant == "sampling":
            config.data.class_aware_sampling = True
        elif variant in ("r50", "r101"):
            config.model.name = f"deeplabv3plus_resnet{variant[1:]}"
        elif variant == "bf16":
            config.mixed_precision = True
        elif variant == "slide":
            config.data.eval_mode = "sliding"
        elif variant not in ("runlocal", "tiny"):
            raise ValueError(
                f"Unknown config variant {variant!r}; use any of "
                f"{', '.join(config_lib.LOSSES)}, sampling, r50, r101, bf16, slide, "
                "runlocal, comma-separated."
            )
    if {"runlocal", "tiny"} & set((arg or "").split(",")):
        # Tiny crops of downscaled images, a small U-Net, three steps.
        config.data.crop_size = (32, 32)
        config.data.base_size = (64, 128)
        config.data.eval_window = (32, 32)
        config.data.eval_stride = (21, 21)
        config.data.sampling_refresh_steps = 2
        config.model.name = "unet_small"
        config.global_batch_size = 8
        config.data.eval_batch_size = 8
        config.num_train_steps = 3
        config.log_every_steps = 1
        config.eval_every_steps = 3
        config.checkpoint_every_steps = 3
    return config_lib.apply_variants(config, ",".join(loss_variants))
