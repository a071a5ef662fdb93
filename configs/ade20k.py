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
* ``tta``: test-time augmentation in evaluation and prediction, as mmsegmentation's aug-test
  (scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 and horizontal flip; mean softmax probabilities);
* ``segformer_b0`` ... ``segformer_b5``: SegFormer instead of DeepLabV3+, with its recipe
  (below; docs/segformer_recipes.md);
* ``tiny`` (alias ``runlocal``): six steps on tiny crops with a small U-Net (SegFormer-B0 with
  a ``segformer_b*`` variant), for smoke tests.

Fewer accelerators than the recipe's (or less memory): ``--config.grad_accum_steps=k`` runs the
global batch of 16 as k micro-batches with the same loss and gradients (exact; BatchNorm
normalises each micro-batch) for about one more forward pass per step.

The recipe (mmsegmentation's DeepLabV3+ R-101-D8 512x512 160k): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, poly decay (power 0.9), global batch 16; images rescaled to fit
(short side 512, long side 2048), then by a random ratio in [0.5, 2.0], 512x512 crops padded
with the ignore label, horizontal flip, photometric distortion; evaluation on the validation
split at the same scale, with predictions resized back to each annotation's resolution.

The SegFormer recipe (mmsegmentation's SegFormer MiT-B* 8xb2 512x512 160k; pass the
ImageNet-pretrained MiT encoder with ``--config.model.pretrained``): AdamW lr 6e-5, weight decay
0.01 (none on norms and biases), the decode head's learning rate x10, linear warm-up over 1500
steps then poly decay (power 1.0); the same 512x512 crops, global batch 16, 160k steps and
whole-image evaluation as above.
"""

from tce_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.get_recipe_config()
    config.data.name = "ade20k"
    config.data.crop_size = (512, 512)
    config.data.base_size = (512, 2048)  # (short, long) side before the random ratio
    config.data.eval_batch_size = 16
    config.data.eval_window = (512, 512)
    config.data.eval_stride = (341, 341)
    config.global_batch_size = 16
    config.num_train_steps = 160_000
    config.eval_every_steps = 16_000
    config.checkpoint_every_steps = 8_000
    tiny_data = dict(
        crop_size=(32, 32), base_size=(64, 128), eval_window=(32, 32), eval_stride=(21, 21)
    )
    return config_lib.apply_variants(config, arg, tiny_data=tiny_data)
