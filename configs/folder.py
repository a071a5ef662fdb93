"""Your own dataset: a folder of images and PNG label maps (mmsegmentation's layout).

``config.data.folder.root`` holds ``classes.txt``, ``img_dir/{train,val,test}`` and
``ann_dir/{train,val,test}`` (see docs/folder_dataset.md); the first run prepares it::

    python -m tce_jax.main --config=configs/folder.py:tce --workdir=workdirs/mine_tce \\
        --config.data.folder.root=/data/my_dataset \\
        --config.model.pretrained=/data/weights/resnet50.safetensors

Data fields: ``data.folder.root``, ``data.folder.img_suffix`` (default ``.jpg``),
``data.folder.seg_map_suffix`` (``.png``), ``data.folder.reduce_zero_label`` (0 -> 255,
k -> k - 1) and ``data.folder.label_map`` (``"raw:train_id,..."``).

Variants, after a colon, comma-separated:

* ``ce``, ``tce``, ``stochastic_tce`` (and the other losses): the loss (default ``tce``);
* ``unet``: a U-Net trained from scratch with AdamW (lr 3e-3, poly decay, 50 warm-up steps)
  instead of DeepLabV3+;
* ``sampling``: tilted class-aware sampling (with ``stochastic_tce``);
* ``r50`` / ``r101``: the DeepLabV3+ backbone (default ResNet-50), output stride 8;
* ``segformer_b0`` ... ``segformer_b5``: SegFormer with mmsegmentation's SegFormer schedule
  (AdamW lr 6e-5, weight decay 0.01, decode head x10, 1500 warm-up steps, poly decay power 1.0;
  docs/segformer_recipes.md) instead of DeepLabV3+;
* ``bf16``: bfloat16 compute (parameters stay float32);
* ``slide``: sliding-window evaluation (512x512 windows, stride 341) instead of whole images;
* ``tiny`` (alias ``runlocal``): six steps on tiny crops with a small U-Net, for smoke tests.

The default recipe is mmsegmentation's DeepLabV3+ R-50-D8 512x512 (SGD lr 0.01, momentum
0.9, weight decay 5e-4, poly decay, batch 16, random resize [0.5, 2.0], crops padded with the
ignore label, flip, photometric distortion) for 40k steps, at the images' native size
(``data.base_size=()``; set ``(short, long)`` to rescale them first). Evaluation on the
validation split; add the test split (labelled) with
``--config.data.final_eval_splits='("validation","test")'``.
"""

from tce_jax import config_lib


def get_config(arg: str | None = None):
    variants = [v for v in (arg or "").split(",") if v]
    config = config_lib.get_recipe_config()
    config.data.name = "folder"
    config.data.crop_size = (512, 512)
    config.data.base_size = ()  # native size
    config.data.eval_batch_size = 8
    config.data.eval_window = (512, 512)
    config.data.eval_stride = (341, 341)
    config.model.name = "deeplabv3plus_resnet50"
    config.global_batch_size = 16
    config.num_train_steps = 40_000
    config.eval_every_steps = 4_000
    config.checkpoint_every_steps = 2_000
    if "unet" in variants:
        config.model.name = "unet"
        opt = config.optimizer
        opt.name, opt.learning_rate, opt.weight_decay = "adamw", 3e-3, 1e-4
        opt.schedule, opt.warmup_steps = "poly", 50
    tiny_data = dict(crop_size=(32, 32), base_size=(), eval_window=(32, 32), eval_stride=(21, 21))
    recipe_variants = ",".join(v for v in variants if v != "unet")
    return config_lib.apply_variants(config, recipe_variants, tiny_data=tiny_data)
