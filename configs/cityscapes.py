"""Cityscapes (19 classes): DeepLabV3+ in the standard 80k-iteration setting.

Needs ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` in the manual directory
(see docs/datasets.md); the first run prepares the TFDS dataset from them::

    python -m tce_jax.main --config=configs/cityscapes.py:tce --workdir=workdirs/cs_tce \
        --config.data.manual_dir=/data/cityscapes_zips \
        --config.model.pretrained=/data/weights/resnet101.npz

Variants, after a colon, comma-separated:

* ``ce``, ``tce``, ``stochastic_tce``: the loss (default ``tce``);
* ``sampling``: tilted class-aware sampling (with ``stochastic_tce``);
* ``r50`` / ``r101``: the backbone (default ResNet-101), output stride 8;
* ``bf16``: bfloat16 compute (parameters stay float32);
* ``slide``: sliding-window evaluation (512x1024 windows, stride 341x682) instead of whole
  images;
* ``tta``: test-time augmentation in evaluation and prediction, as mmsegmentation's aug-test
  (scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 and horizontal flip; mean softmax probabilities);
* ``segformer_b0`` ... ``segformer_b5``: SegFormer instead of DeepLabV3+, with its recipe
  (below; docs/segformer_recipes.md);
* ``tiny`` (alias ``runlocal``): six steps on tiny crops with a small U-Net (SegFormer-B0 with
  a ``segformer_b*`` variant), for smoke tests.

Fewer accelerators than the recipe's (or less memory): ``--config.grad_accum_steps=k`` runs the
global batch of 8 as k micro-batches with the same loss and gradients (exact; BatchNorm
normalises each micro-batch) for about one more forward pass per step.

The recipe (mmsegmentation's DeepLabV3+ R-101-D8 512x1024 80k): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, poly decay (power 0.9), global batch 8; random resize of the 1024x2048
images by a ratio in [0.5, 2.0], 512x1024 crops padded with the ignore label, horizontal flip
and photometric distortion; evaluation on the validation split at full resolution.

The SegFormer recipe (mmsegmentation's SegFormer MiT-B* 8xb1 1024x1024 160k; pass the
ImageNet-pretrained MiT encoder with ``--config.model.pretrained``): AdamW lr 6e-5, weight decay
0.01 (none on norms and biases), the decode head's learning rate x10, linear warm-up over 1500
steps then poly decay (power 1.0), 160k steps at global batch 8; 1024x1024 crops of the same
augmentation; sliding-window evaluation (1024x1024 windows, stride 768).
"""

from tce_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.get_recipe_config()
    config.data.name = "cityscapes"
    config.data.crop_size = (512, 1024)
    config.data.base_size = (1024, 2048)  # (short, long) side before the random ratio
    config.data.eval_batch_size = 8
    config.data.eval_window = (512, 1024)
    config.data.eval_stride = (341, 682)
    config.global_batch_size = 8
    config.num_train_steps = 80_000
    config.eval_every_steps = 8_000
    config.checkpoint_every_steps = 4_000
    if config_lib.has_segformer_variant(arg):
        # mmsegmentation's SegFormer recipe (segformer_mit-b*_8xb1-160k_cityscapes-1024x1024):
        # 1024x1024 crops (batch 8: 8 GPUs x 1), sliding-window evaluation, 160k steps.
        config.data.crop_size = (1024, 1024)
        config.data.eval_mode = "sliding"
        config.data.eval_window = (1024, 1024)
        config.data.eval_stride = (768, 768)
        config.num_train_steps = 160_000
        config.eval_every_steps = 16_000
        config.checkpoint_every_steps = 8_000
    # tiny: tiny crops of downscaled images; evaluation at the labels' full resolution
    # (predictions resized back).
    tiny_data = dict(
        crop_size=(64, 128), base_size=(128, 256), eval_window=(64, 128), eval_stride=(43, 86)
    )
    return config_lib.apply_variants(config, arg, tiny_data=tiny_data)
