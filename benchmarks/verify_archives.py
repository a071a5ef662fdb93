"""What decoding every file adds to dataset preparation (`archives.verify_members`).

Builds a zip like ``leftImg8bit_trainvaltest.zip`` / ``gtFine_trainvaltest.zip`` in a temporary
directory: N photo-like 1024x2048 RGB PNGs of about 2 MB each (smooth shapes plus sensor-like
noise; flat synthetic images compress to a few KB and decode far faster than photos) and N
Cityscapes-like label maps. Then, in one process:

* baseline: read every member in full (zipfile, which checks each CRC-32): what any
  extraction of the archive costs anyway;
* ``verify_members`` with 1 thread and with one thread per CPU: read plus TensorFlow decode.

Reports seconds per file, the ratios against the baseline, and the extrapolation to the full
Cityscapes release (5000 images and 5000 label maps)::

    python benchmarks/verify_archives.py            # N=32, about a minute on 2 CPU cores
    python benchmarks/verify_archives.py --quick    # N=8

The markdown table is printed and written to ``benchmarks/results/verify_archives.md``
(``verify_archives_quick.md`` with ``--quick``).
"""

import argparse
import datetime
import io
import os
import platform
import tempfile
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import results_file  # noqa: E402
from PIL import Image  # noqa: E402

from tce_jax.datasets import archives  # noqa: E402

HEIGHT, WIDTH = 1024, 2048
CITYSCAPES_FILES = 5000  # images, and as many label maps


def photo_like(rng: np.random.Generator) -> np.ndarray:
    """uint8 [1024, 2048, 3]: a smooth random field plus noise (about 2.3 MB as a PNG)."""
    coarse = rng.integers(0, 256, (HEIGHT // 64, WIDTH // 64, 3)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((64, 64, 1), np.float32))
    noise = rng.normal(0.0, 1.0, (HEIGHT, WIDTH, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def label_like(rng: np.random.Generator) -> np.ndarray:
    """uint8 [1024, 2048]: blocky label ids (a few tens of KB as a PNG, like gtFine)."""
    coarse = rng.integers(0, 34, (HEIGHT // 16, WIDTH // 16)).astype(np.uint8)
    return np.kron(coarse, np.ones((16, 16), np.uint8))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def build(directory: str, n: int) -> tuple[str, list[tuple[str, str]], int]:
    rng = np.random.default_rng(0)
    path = os.path.join(directory, "archive.zip")
    members, total = [], 0
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            for kind, data in ((archives.IMAGE, png(photo_like(rng))), (archives.LABEL, None)):
                data = data if data is not None else png(label_like(rng))
                name = f"x/{i:04d}_{kind}.png"
                archive.writestr(name, data)
                members.append((name, kind))
                total += len(data)
    return path, members, total


def read_all(path: str, members) -> None:
    with zipfile.ZipFile(path) as archive:
        for name, _ in members:
            archive.read(name)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 image/label pairs, not 32")
    args = parser.parse_args()
    n = 8 if args.quick else 32
    workers = archives.default_workers()
    with tempfile.TemporaryDirectory() as directory:
        path, members, total = build(directory, n)
        images = [m for m in members if m[1] == archives.IMAGE]
        mean_image_mb = sum(zipfile.ZipFile(path).getinfo(name).file_size for name, _ in images) / (
            len(images) * 1e6
        )
        verify = archives.verify_members
        archives.verify_members(path, members[:2], "-", workers=1)  # warm up TensorFlow
        times = {
            "read every member (baseline)": timed(lambda: read_all(path, members)),
            "verify_members, 1 thread": timed(lambda: verify(path, members, "-", workers=1)),
            f"verify_members, {workers} threads": timed(
                lambda: verify(path, members, "-", workers=workers)
            ),
        }
    baseline = times["read every member (baseline)"]
    lines = [
        f"# verify_archives ({datetime.date.today()}, {platform.node()}, {workers} CPUs)",
        "",
        f"{n} RGB PNGs of 1024x2048 (mean {mean_image_mb:.1f} MB) and {n} label PNGs; "
        f"archive {total / 1e6:.0f} MB.",
        "",
        "| | seconds | per image + label | x baseline | full Cityscapes (5000 + 5000) |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in times.items():
        per_pair = seconds / n
        lines.append(
            f"| {name} | {seconds:.2f} | {per_pair * 1e3:.0f} ms | {seconds / baseline:.1f} | "
            f"{per_pair * CITYSCAPES_FILES / 60:.1f} min |"
        )
    name = "verify_archives_quick.md" if args.quick else "verify_archives.md"
    results_file.write(name, "\n".join(lines))


if __name__ == "__main__":
    main()
