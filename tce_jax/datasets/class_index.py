"""The class index of a prepared split: the pixels of each class in each example.

:class:`ClassIndex` holds, for every example of a split in the order of its data source, the
pixel count of each train id (after the dataset's label map) and the label map's size. It is
computed once by decoding every label map (:func:`load_class_index`) and cached as
``tce_index-<split>.npz`` next to the prepared TFDS data (``builder.data_dir``). Tilted
class-aware sampling reads which classes each example contains (``tce_jax.sampling``);
evaluation reads the sizes (``tce_jax.input_pipeline.Dataset.eval_geometry``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures

import jax
import numpy as np

from tce_jax.datasets import archives

_INDEX_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ClassIndex:
    """Per-example class statistics of one split, in the order of its data source.

    Attributes:
      counts: int32 ``[N, C]``, pixels of each train id in each example's label map.
      sizes: int32 ``[N, 2]``, each label map's ``(height, width)``.
    """

    counts: np.ndarray
    sizes: np.ndarray

    @property
    def presence(self) -> np.ndarray:
        """bool ``[N, C]``: which classes each example contains."""
        return self.counts > 0

    @property
    def num_examples(self) -> int:
        return self.counts.shape[0]


def _decode_label(data, label_map: np.ndarray | None) -> np.ndarray:
    """uint8 ``[H, W]`` train ids from PNG bytes (or an already decoded array)."""
    if isinstance(data, bytes | np.bytes_):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(data))) as image:
            if image.mode != "L":
                raise ValueError(f"expected an 8-bit grey label map, got PIL mode {image.mode}")
            values = np.asarray(image)
    else:
        values = np.asarray(data)
    if values.ndim == 3:
        values = values[..., 0]
    values = values.astype(np.uint8, copy=False)
    return values if label_map is None else np.asarray(label_map, np.uint8)[values]


def compute_class_index(
    source: Sequence[Mapping],
    label_key: str,
    num_classes: int,
    label_map: np.ndarray | None = None,
    *,
    describe=str,
    num_threads: int = 8,
) -> ClassIndex:
    """Decodes every label map of ``source`` (a TFDS data source) and counts classes.

    Args:
      source: random-access examples; ``source[i][label_key]`` is PNG bytes or an array.
      label_key: feature name of the label map.
      num_classes: C; values ``>= C`` after ``label_map`` (ignore, 255) are not counted.
      label_map: optional ``[256]`` look-up table from raw label values to train ids.
      describe: ``describe(i)`` names example ``i`` in error messages.
      num_threads: label maps are decoded in parallel (PNG decoding releases the GIL).

    Raises:
      DatasetNotFoundError: a label map does not decode; the message names the example.
    """
    n = len(source)
    counts = np.zeros((n, num_classes), np.int32)
    sizes = np.zeros((n, 2), np.int32)

    def one(i: int, data) -> None:
        try:
            label = _decode_label(data, label_map)
        except Exception as e:  # PIL raises several types for broken files.
            raise archives.DatasetNotFoundError(
                f"The label map of {describe(i)} does not decode ({type(e).__name__}: {e}). "
                "The prepared data are corrupt: delete the prepared dataset directory and "
                "prepare it again from the official archives."
            ) from e
        counts[i] = np.bincount(label.ravel(), minlength=256)[:num_classes]
        sizes[i] = label.shape

    # Records are read in this thread (in order); only the decoding runs in the pool.
    with futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        pending: list[futures.Future] = []
        for i in range(n):
            pending.append(pool.submit(one, i, source[i][label_key]))
            if len(pending) > 4 * num_threads:
                pending.pop(0).result()
        for future in pending:
            future.result()
    return ClassIndex(counts=counts, sizes=sizes)


def index_path(data_dir: str, split) -> str:
    """Where the class index of ``split`` is cached: next to the prepared TFDS files."""
    text = str(split)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60]
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return os.path.join(os.fspath(data_dir), f"tce_index-{safe}-{digest}.npz")


def _fingerprint(builder, spec, split, num_examples: int) -> str:
    label_map = b"" if spec.label_map is None else np.asarray(spec.label_map, np.uint8).tobytes()
    return "|".join(
        [
            f"format={_INDEX_FORMAT}",
            f"tfds={spec.tfds_name}",
            f"version={builder.info.version}",
            f"split={split}",
            f"n={num_examples}",
            f"classes={spec.num_classes}",
            f"label_map={hashlib.sha1(label_map).hexdigest()}",
        ]
    )


def load_class_index(builder, spec, split, *, cache: bool = True) -> ClassIndex:
    """The class index of ``split`` of a prepared dataset: from the cache, or computed once.

    The cache file (see :func:`index_path`) holds a fingerprint of the dataset, split, label
    map and number of classes; a stale or unreadable file is recomputed. If the data dir is
    read-only the index is computed and kept in memory only.
    """
    from tensorflow_datasets import decode

    source = builder.as_data_source(
        split=split,
        decoders={spec.image_key: decode.SkipDecoding(), spec.label_key: decode.SkipDecoding()},
    )
    fingerprint = _fingerprint(builder, spec, split, len(source))
    path = index_path(builder.data_dir, split)
    if cache and os.path.exists(path):
        try:
            with np.load(path) as f:
                if str(f["fingerprint"]) == fingerprint:
                    return ClassIndex(counts=f["counts"], sizes=f["sizes"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another format: recompute

    def describe(i: int) -> str:
        example_id = ""
        for key in ("image_id", "id"):
            try:
                example_id = f" ({source[i][key]!r})"
                break
            except Exception:  # noqa: BLE001 - only for the message
                continue
        return f"example {i}{example_id} of {spec.tfds_name} split {split} in {builder.data_dir}"

    index = compute_class_index(
        source, spec.label_key, spec.num_classes, spec.label_map, describe=describe
    )
    if cache:
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, counts=index.counts, sizes=index.sizes, fingerprint=fingerprint)
            os.replace(tmp, path)  # atomic: concurrent writers leave one complete file
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    return index


def shard_positions(builder, split, shard_split) -> np.ndarray:
    """int64 ``[n_shard]``: the position in ``split``'s data source of each example of
    ``shard_split`` (a sub-split of it, e.g. from ``tfds.split_for_jax_process``).

    Both data sources read their files' records in the order of their file instructions;
    this matches the two instruction lists.
    """
    starts: dict[str, list[tuple[int, int, int]]] = {}
    position = 0
    for fi in builder.info.splits[split].file_instructions:
        starts.setdefault(fi.filename, []).append((fi.skip, fi.take, position))
        position += fi.take
    out = []
    for fi in builder.info.splits[shard_split].file_instructions:
        for skip, take, start in starts.get(fi.filename, ()):
            if skip <= fi.skip and fi.skip + fi.take <= skip + take:
                out.append(np.arange(fi.take, dtype=np.int64) + start + fi.skip - skip)
                break
        else:
            raise ValueError(f"{shard_split} is not a sub-split of {split}.")
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def get_class_index(builder, spec, split) -> ClassIndex:
    """:func:`load_class_index` for every process of a run: process 0 computes it first (in
    multi-process runs), the others then read its cache.
    """
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            load_class_index(builder, spec, split)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"class index {spec.tfds_name} {split}")
    return load_class_index(builder, spec, split)
