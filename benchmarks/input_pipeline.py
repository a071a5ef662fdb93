"""Training-transform throughput on Cityscapes-size photographs, relative to PNG decoding alone.

    python benchmarks/input_pipeline.py [--images=8] [--count=48] [--repeats=3]

Generates `--images` textured 1024x2048 photographs (smooth gradients, multi-scale noise,
sharp-edged shapes and sensor noise: PNGs of about 2 MB, like real Cityscapes images) and their
label maps, then measures in one process, in interleaved rounds of `--count` images:

* decode: `tf.io.decode_png` of the same files, in a parallel tf.data map;
* transform: what training runs per example on the host, `example_transforms.train_transform`
  (decode, then `train_augment`) with the Cityscapes recipe (`configs/cityscapes.py`: base
  size 1024x2048, random ratio 0.5-2.0, 512x1024 crop, flip, photometric jitter drawn), in the
  same kind of parallel tf.data map. The jitter itself is applied in the train step on the
  device (`device_transforms.photometric_on_device`), like the normalisation.

Prints images/s of both (median over rounds), their ratio (target: transform >= 0.5x decode),
images/s per core, the bytes per training example that leave the pipeline, and the backend.
Ratios measured in one process are robust to other jobs on the machine; absolute rates are not.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the pipeline runs on the host

import numpy as np  # noqa: E402

HEIGHT, WIDTH = 1024, 2048


def _field(rng, cells_h: int, cells_w: int) -> np.ndarray:
    """A smooth random field [HEIGHT, WIDTH, 3] in [-1, 1]: random values on a coarse grid,
    bilinearly interpolated."""
    import tensorflow as tf

    coarse = rng.uniform(-1, 1, (1, cells_h + 1, cells_w + 1, 3)).astype(np.float32)
    return tf.image.resize(coarse, (HEIGHT, WIDTH), method="bilinear")[0].numpy()


def synthetic_photograph(rng) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image [1024, 2048, 3] with photo-like texture and uint8 label ids [1024, 2048]."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = rng.uniform(60, 180, 3).astype(np.float32)
    tilt = rng.uniform(-40, 40, (2, 3)).astype(np.float32)
    image = base + tilt[0] * (y / HEIGHT)[..., None] + tilt[1] * (x / WIDTH)[..., None]
    for cells, amplitude in ((4, 40.0), (16, 25.0), (64, 15.0), (256, 10.0)):  # multi-scale
        image += amplitude * _field(rng, cells // 2, cells)
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    for _ in range(40):  # sharp-edged objects with their own shading and class
        h, w = rng.integers(20, 400, 2)
        top, left = rng.integers(0, HEIGHT - h), rng.integers(0, WIDTH - w)
        region = (slice(top, top + h), slice(left, left + w))
        image[region] = 0.5 * image[region] + rng.uniform(0, 128, 3)
        label[region] = rng.integers(7, 34)
    image += rng.normal(0, 1.6, image.shape)  # sensor noise: what makes photos about 2 MB
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def encode_files(count: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        image, label = synthetic_photograph(rng)
        images.append(tf.io.encode_png(image).numpy())
        labels.append(tf.io.encode_png(label[..., None]).numpy())
    return images, labels


def time_pipeline(dataset, count: int) -> float:
    """Images/s of `dataset` (unbatched) over `count` elements, after a warm-up element."""
    iterator = iter(dataset.prefetch(2))
    next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return count / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="distinct photographs")
    parser.add_argument("--count", type=int, default=48, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from configs import cityscapes
    from tce_jax import datasets, example_transforms

    config = cityscapes.get_config()
    spec = datasets.get_dataset_spec("cityscapes")
    images, labels = encode_files(args.images)
    mb = np.mean([len(b) for b in images]) / 2**20
    print(f"{args.images} photographs {HEIGHT}x{WIDTH}, PNG {mb:.2f} MB on average")

    files = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().enumerate()
    parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}

    def decode(position, files):
        image, label = files
        return tf.io.decode_png(image, channels=3), tf.io.decode_png(label, channels=1)

    augment = example_transforms.train_transform(spec, config.data)

    def transform(position, files):
        seed = tf.stack([tf.constant(config.seed, tf.int64), position])  # as in training
        return augment(*files, seed)

    pipelines = {
        "decode": files.map(decode, **parallel),
        "transform": files.map(transform, **parallel),
    }
    rates = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, dataset in pipelines.items():
            rates[name].append(time_pipeline(dataset, args.count))
    median = {name: statistics.median(v) for name, v in rates.items()}
    example = next(iter(pipelines["transform"]))
    out_bytes = sum(int(np.prod(t.shape)) * t.dtype.size for t in example.values())

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    decode_rate, transform_rate = median["decode"], median["transform"]
    ratio = transform_rate / decode_rate
    print(f"backend: TensorFlow {tf.__version__} tf.data on {cores} CPU cores")
    for name, rate in (("PNG decode", decode_rate), ("training transform", transform_rate)):
        print(f"{name + ':':20s}{rate:6.2f} images/s ({rate / cores:.2f} per core)")
    print(f"transform / decode: {ratio:.3f} (target >= 0.5)")
    image_dtype = example["image"].dtype.name
    print(f"bytes per training example leaving the pipeline: {out_bytes:,} ({image_dtype})")
    print(
        f"| {decode_rate:.1f} | {transform_rate:.1f} | {ratio:.3f} | "
        f"{transform_rate / cores:.2f} | {out_bytes / 2**20:.2f} MB |"
    )


if __name__ == "__main__":
    main()
