"""Segmentation metrics: confusion matrix, per-class IoU and fairness figures.

The evaluation accumulates one ``[C, C]`` confusion matrix (rows = true class, columns =
predicted class) over the *whole* split, and each image's per-class TP/FP/FN, then derives every
figure from them on the host:

* :func:`confusion_matrix` — inside the jitted eval step, from integer predictions and labels;
* :func:`segmentation_figures` — pixel/mean-class accuracy, per-class IoU, mIoU and the fairness
  figures (IoU std, worst-class IoU, worst-25% mIoU, max-min gap), in float64 numpy;
* :func:`fine_grained_figures` — the image- and class-level mIoUs of Wang et al. (NeurIPS 2023)
  and their worst cases, from each image's per-class counts (:func:`class_counts` of the
  per-example matrices of ``confusion_matrix(..., per_example=True)``);
* :func:`flatten_figures`, :func:`write_report`, :func:`format_table` — scalars for metric
  writers, ``report.md``/``per_class.csv`` for a workdir, a CE-vs-TCE comparison table.

This module needs only JAX and numpy. With ``jax.jit`` over a device mesh (batch sharded on the
data axis) call :func:`confusion_matrix` on the global batch and XLA reduces across devices;
under ``jax.pmap``/``shard_map`` add ``jax.lax.psum(matrix, axis_name)``. Sum the per-batch
matrices on the host in int64 (``np.asarray(m, np.int64)``): the device counts are int32, exact
up to 2**31 - 1 pixels per cell, i.e. per batch (float32 counts would lose exactness past
2**24 = 16.7M pixels, about eight 1024x2048 Cityscapes images).
"""

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "confusion_matrix",
    "segmentation_figures",
    "flatten_figures",
    "write_report",
    "format_table",
    "markdown_table",
    "SUMMARY_KEYS",
    "class_counts",
    "image_class_iou",
    "worst_mean",
    "fine_grained_figures",
    "FINE_GRAINED_KEYS",
]

# Scalar figures of `segmentation_figures`, in report order, with their display names.
SUMMARY_KEYS: tuple[str, ...] = (
    "miou",
    "pixel_accuracy",
    "mean_accuracy",
    "iou_std",
    "worst_iou",
    "worst25_miou",
    "iou_gap",
)
_DISPLAY_NAMES: dict[str, str] = {
    "miou": "mIoU",
    "pixel_accuracy": "pixel accuracy",
    "mean_accuracy": "mean class accuracy",
    "iou_std": "IoU std (population, ddof=0)",
    "worst_iou": "worst-class IoU",
    "worst25_miou": "worst-25% mIoU",
    "iou_gap": "max-min IoU gap",
    "image_miou": "image-level mIoU (mIoU^I)",
    "image_miou_worst5": "worst-5% images' mIoU^I",
    "image_miou_qbar": "worst-q% mIoU^I, mean over q = 10..100",
    "class_miou": "class-level mIoU (mIoU^C)",
    "class_miou_worst5": "worst-5% images' mIoU^C",
    "class_miou_qbar": "worst-q% mIoU^C, mean over q = 10..100",
}
# The fine-grained figures of `fine_grained_figures` (Wang et al., NeurIPS 2023), in report
# order: the worst-case percentage the authors' released evaluation reports, and their average
# over q = 10%, 20%, ..., 100% ("q bar").
WORST_PERCENT = 5
QBAR_PERCENTS = tuple(range(10, 101, 10))
FINE_GRAINED_KEYS: tuple[str, ...] = tuple(
    f"{level}_miou{suffix}"
    for level in ("image", "class")
    for suffix in ("", f"_worst{WORST_PERCENT}", "_qbar")
)


# --------------------------------------------------------------------------------------------
# Confusion matrix (device side)
# --------------------------------------------------------------------------------------------


def confusion_matrix(
    predictions: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mask: jax.Array | None = None,
    ignore_index: int | None = 255,
    per_example: bool = False,
) -> jax.Array:
    """Confusion matrix of integer predictions against integer labels.

    Args:
      predictions: ``[...]`` integer predicted classes in ``[0, C)``.
      labels: ``[...]`` integer true classes, same shape as ``predictions``.
      num_classes: C.
      mask: optional boolean mask, either of the shape of ``labels`` (per pixel) or of a prefix
        of it, e.g. ``[B]`` for ``[B, H, W]`` labels (per example: the padding of the last eval
        batch); it is broadcast over the trailing axes.
      ignore_index: label excluded from the counts (None: only the range check).
      per_example: one matrix per example (the leading axis of ``labels``), for the per-image
        figures of :func:`fine_grained_figures`.

    Returns:
      ``[C, C]`` int32 matrix ``M[i, j] = #{valid pixels with label i predicted as j}``, valid
      meaning ``label != ignore_index``, ``0 <= label < C`` and ``mask`` true (``[B, C, C]``
      with ``per_example``). Built with one ``segment_sum`` over ``label * C + prediction``
      (plus ``example * C * C`` per example; no ``[pixels, C, C]`` one-hot), so it is cheap on
      full-resolution images and partitions under ``jit`` with sharded inputs.
    """
    predictions = jnp.asarray(predictions)
    labels = jnp.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must have the same shape."
        )
    for name, x in (("predictions", predictions), ("labels", labels)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be integers (class ids), got {x.dtype}; pass "
                "logits.argmax(-1) as predictions."
            )
    num_classes = int(num_classes)
    # Cast before any arithmetic: uint8 labels would wrap in `label * C`.
    labels = labels.astype(jnp.int32)
    predictions = predictions.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid &= labels != ignore_index
    if mask is not None:
        valid &= _broadcast_mask(jnp.asarray(mask), labels.shape)
    ids = jnp.where(valid, labels * num_classes + predictions, 0)
    matrices = 1
    if per_example:
        matrices = labels.shape[0]
        example = jnp.arange(matrices, dtype=jnp.int32).reshape((-1,) + (1,) * (labels.ndim - 1))
        ids = ids + example * (num_classes * num_classes)
    counts = jax.ops.segment_sum(
        valid.astype(jnp.int32).ravel(),
        ids.ravel(),
        num_segments=matrices * num_classes * num_classes,
    )
    shape = (num_classes, num_classes)
    return counts.reshape((matrices, *shape) if per_example else shape)


def class_counts(confusion):
    """``[..., 3, C]``: true positives, false positives and false negatives of each class, from
    ``[..., C, C]`` confusion matrices (in the eval step: one row per image)."""
    tp = confusion.diagonal(axis1=-2, axis2=-1)
    return jnp.stack([tp, confusion.sum(-2) - tp, confusion.sum(-1) - tp], axis=-2)


def _broadcast_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Broadcasts a per-example (prefix-shaped) or per-pixel mask to ``shape``, as bool."""
    if mask.shape != tuple(shape[: mask.ndim]):
        raise ValueError(
            f"mask has shape {mask.shape} but labels have shape {tuple(shape)}: pass a "
            "per-example mask of shape [B] or a per-pixel mask of the labels' shape."
        )
    mask = mask.astype(bool).reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return jnp.broadcast_to(mask, shape)


# --------------------------------------------------------------------------------------------
# Figures (host side, float64 numpy)
# --------------------------------------------------------------------------------------------


def segmentation_figures(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class IoU, mIoU and fairness figures from a confusion matrix.

    With ``M`` the ``[C, C]`` matrix (rows = true class, cols = predicted), ``TP_c = M[c, c]``,
    ``G_c = sum_j M[c, j]`` (label pixels), ``P_c = sum_i M[i, c]`` (predicted pixels),
    ``N = sum G``::

        pixel_accuracy = sum_c TP_c / N
        accuracy_c     = TP_c / G_c                    (NaN if G_c = 0)
        mean_accuracy  = mean of accuracy_c over classes with G_c > 0
        iou_c          = TP_c / (G_c + P_c - TP_c)     (NaN if the class is absent from both
                                                        labels and predictions)
        frequency_c    = G_c / N                       (label share; 0 if N = 0)

    Over the present classes ``K = {c: G_c + P_c > 0}`` (in labels *or* predictions; a class
    predicted but never labelled has IoU 0 and counts), with ``n = |K|``::

        miou         = mean_{c in K} iou_c
        iou_std      = sqrt(mean_{c in K} (iou_c - miou)^2)   population std (ddof=0): the
                       present classes are the whole population, not a sample
        worst_iou    = min_{c in K} iou_c
        worst25_miou = mean of the k = max(1, ceil(n / 4)) lowest iou_c
        iou_gap      = max_{c in K} iou_c - worst_iou

    Args:
      confusion: ``[C, C]`` non-negative counts (any numeric dtype; computed in float64).

    Returns:
      dict with float scalars ``pixel_accuracy``, ``mean_accuracy``, ``miou``, ``iou_std``,
      ``worst_iou``, ``worst25_miou``, ``iou_gap`` (fractions in [0, 1]; NaN only if the matrix is
      all zero); ``[C]`` float64 arrays ``iou``, ``accuracy``, ``frequency``; ``[C]`` bool
      ``present``; ints ``num_classes``, ``num_present``, ``worst25_count`` (k),
      ``worst_class`` (index, -1 if none) and ``num_pixels`` (N).
    """
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {m.shape}.")
    m = m.astype(np.float64)
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError("confusion must hold finite, non-negative counts.")
    num_classes = m.shape[0]
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    total = gt.sum()
    union = gt + pred - tp

    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(gt > 0, tp / gt, np.nan)
        iou = np.where(union > 0, tp / union, np.nan)
    frequency = gt / total if total > 0 else np.zeros(num_classes)
    present = union > 0
    labelled = gt > 0

    nan = float("nan")
    pixel_accuracy = float(tp.sum() / total) if total > 0 else nan
    mean_accuracy = float(accuracy[labelled].mean()) if labelled.any() else nan

    present_iou = iou[present]
    num_present = int(present_iou.size)
    if num_present:
        ordered = np.sort(present_iou)
        worst25_count = max(1, math.ceil(num_present / 4))
        miou = float(present_iou.mean())
        iou_std = float(present_iou.std(ddof=0))
        worst_iou = float(ordered[0])
        worst25_miou = float(ordered[:worst25_count].mean())
        iou_gap = float(ordered[-1] - ordered[0])
        # Lowest IoU among present classes; ties go to the lowest class index.
        worst_class = int(np.flatnonzero(present)[np.argmin(present_iou)])
    else:
        worst25_count = 0
        miou = iou_std = worst_iou = worst25_miou = iou_gap = nan
        worst_class = -1

    return {
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": mean_accuracy,
        "miou": miou,
        "iou_std": iou_std,
        "worst_iou": worst_iou,
        "worst25_miou": worst25_miou,
        "iou_gap": iou_gap,
        "iou": iou,
        "accuracy": accuracy,
        "frequency": frequency,
        "present": present,
        "num_classes": num_classes,
        "num_present": num_present,
        "worst25_count": worst25_count,
        "worst_class": worst_class,
        "num_pixels": int(round(total)),
    }


def image_class_iou(counts: np.ndarray) -> np.ndarray:
    """``IoU[i, c]`` (float64 ``[N, C]``) of the images with a labelled pixel.

    Args:
      counts: ``[images, 3, C]`` per-image true positives, false positives and false negatives
        of each class (:func:`class_counts` of the per-image confusion matrices), counted over
        the image's valid pixels only (ignored pixels count in neither label nor prediction).

    Returns:
      ``TP / (TP + FP + FN)`` where class c is in the label or the prediction of image i
      (``TP + FP + FN > 0``; a class only predicted scores 0), NaN where it is in neither.
      Images without a labelled pixel (the padding of the last batch, images wholly ignored)
      are dropped.
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 3 or counts.shape[1] != 3:
        raise ValueError(f"counts must be [images, 3, C] (TP, FP, FN), got {counts.shape}.")
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    scored = tp + fp + fn > 0  # in the image's label or its prediction
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(scored, tp / (tp + fp + fn), np.nan)
    return iou[(tp + fn > 0).any(axis=1)]


def worst_mean(values: np.ndarray, percent: int) -> float:
    """Mean of the ``max(1, floor(percent * n / 100))`` lowest of ``n`` values (NaN if none);
    ``percent = 100`` is the mean. The floor is exact (integers: the authors' float product can
    fall one short, e.g. 70% of 90)."""
    ordered = np.sort(np.asarray(values, np.float64))
    if ordered.size == 0:
        return float("nan")
    return float(ordered[: max(1, percent * ordered.size // 100)].mean())


def fine_grained_figures(counts: np.ndarray) -> dict[str, Any]:
    """The fine-grained mIoUs of Wang et al. (NeurIPS 2023) from per-image counts.

    With ``IoU[i, c]`` of :func:`image_class_iou` (N images with a labelled pixel; ``K_i`` the
    classes in the label or the prediction of image i; ``I_c`` the images where class c is in
    the label or the prediction)::

        image_iou_i      = mean_{c in K_i} IoU[i, c]
        image_miou       = mean_i image_iou_i                               (mIoU^I)
        class_miou       = mean over classes with I_c non-empty of
                           mean_{i in I_c} IoU[i, c]                        (mIoU^C)
        image_miou_worst5 = worst_mean(image_iou, 5)                        (mIoU^I_5)
        class_miou_worst5 = mean_c worst_mean({IoU[i, c] : i in I_c}, 5)    (mIoU^C_5)
        *_qbar           = mean over q = 10, 20, ..., 100 of the worst-q% figure

    Args:
      counts: ``[images, 3, C]`` as for :func:`image_class_iou`, every image of the split once
        (rows of padding are dropped there).

    Returns:
      dict with the float figures of ``FINE_GRAINED_KEYS`` (fractions; NaN without images) and
      ``num_images`` (N).
    """
    iou = image_class_iou(counts)
    present = ~np.isnan(iou)
    image_iou = np.where(present, iou, 0.0).sum(axis=1) / present.sum(axis=1)
    class_ious = [column[~np.isnan(column)] for column in iou.T]
    class_ious = [values for values in class_ious if values.size]

    def image(percent: int) -> float:
        return worst_mean(image_iou, percent)

    def per_class(percent: int) -> float:
        if not class_ious:
            return float("nan")
        return float(np.mean([worst_mean(values, percent) for values in class_ious]))

    figures: dict[str, Any] = {}
    for level, figure in (("image", image), ("class", per_class)):
        figures[f"{level}_miou"] = figure(100)
        figures[f"{level}_miou_worst{WORST_PERCENT}"] = figure(WORST_PERCENT)
        figures[f"{level}_miou_qbar"] = float(np.mean([figure(q) for q in QBAR_PERCENTS]))
    figures["num_images"] = int(image_iou.size)
    return figures


def _check_class_names(figures: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    num_classes = len(np.asarray(figures["iou"]))
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} names but the figures have {num_classes} classes."
        )
    return names


def flatten_figures(figures: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, float]:
    """Scalars for metric writers / ``metrics.jsonl``.

    Returns ``{"miou", "pixel_accuracy", "mean_accuracy", "iou_std", "worst_iou",
    "worst25_miou", "iou_gap", "iou/<class_name>" ...}`` as Python floats (fractions in
    [0, 1]), and the ``FINE_GRAINED_KEYS`` that ``figures`` has (an evaluation's have them).
    Classes absent from labels and predictions are omitted, and so is any summary figure that
    is NaN (only for an all-zero matrix), so the result is NaN-free.
    """
    names = _check_class_names(figures, class_names)
    flat: dict[str, float] = {}
    for key in _summary_keys(figures):
        value = float(figures[key])
        if not math.isnan(value):
            flat[key] = value
    for name, value in zip(names, np.asarray(figures["iou"], np.float64), strict=True):
        if not math.isnan(value):
            flat[f"iou/{name}"] = float(value)
    return flat


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _summary_keys(figures: Mapping[str, Any]) -> tuple[str, ...]:
    """SUMMARY_KEYS, then the fine-grained figures if ``figures`` has them."""
    return SUMMARY_KEYS + tuple(k for k in FINE_GRAINED_KEYS if k in figures)


def _pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; "n/a" for NaN."""
    value = float(value)
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def _cell(value: Any) -> str:
    """Markdown-safe cell text."""
    if isinstance(value, float | np.floating):
        text = f"{float(value):.6g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A padded markdown table: the first ``left`` columns left-aligned, the others right-aligned.

    Used by the run reports here and by the experiment reports (``experiments/report_render.py``).
    """
    widths = [max(3, len(h)) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i < left else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join(
        [line(header), "|" + "|".join(f" {r} " for r in rule) + "|"] + [line(r) for r in rows]
    )


def _summary_rows(figures: Mapping[str, Any], names: Sequence[str]) -> list[list[str]]:
    worst = int(figures["worst_class"])
    worst_name = f" ({names[worst]})" if worst >= 0 else ""
    k = int(figures["worst25_count"])
    rows = []
    for key in _summary_keys(figures):
        label = _DISPLAY_NAMES[key]
        value = _pct(figures[key])
        if key == "worst_iou":
            value += worst_name
        elif key == "worst25_miou":
            label += f" ({k} of {int(figures['num_present'])} classes)"
        rows.append([label, value])
    return rows


def write_report(
    workdir: str | os.PathLike,
    figures: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    title: str,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Writes ``report.md`` and ``per_class.csv`` into ``workdir`` (created if missing).

    ``report.md``: the title, a per-class table (IoU, accuracy, label frequency, percentages
    with one decimal; "n/a" where undefined), the summary figures, the fairness figures over the
    present classes, and ``extra`` (e.g. step, config values) as a key/value table.
    ``per_class.csv``: columns ``class, iou, accuracy, frequency`` as fractions at full
    precision (``nan`` where undefined).

    Args:
      workdir: output directory.
      figures: the dict of :func:`segmentation_figures`.
      class_names: C names, in class-index order.
      title: report heading.
      extra: optional further key/value pairs for the report.

    Returns:
      The paths of ``report.md`` and ``per_class.csv``.
    """
    # Imported here: the rest of this module needs only JAX and numpy (the core install);
    # etils comes with the training system. Workdirs may be local or gs://.
    from etils import epath

    names = _check_class_names(figures, class_names)
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    iou = np.asarray(figures["iou"], np.float64)
    acc = np.asarray(figures["accuracy"], np.float64)
    freq = np.asarray(figures["frequency"], np.float64)

    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["class", "iou", "accuracy", "frequency"])
    for row in zip(names, iou, acc, freq, strict=True):
        writer.writerow([row[0], *(repr(float(v)) for v in row[1:])])
    csv_path = directory / "per_class.csv"
    csv_path.write_text(rows.getvalue(), encoding="utf-8")

    class_rows = [
        [_cell(n), _pct(i), _pct(a), _pct(fr)]
        for n, i, a, fr in zip(names, iou, acc, freq, strict=True)
    ]
    summary = _summary_rows(figures, names)
    parts = [
        f"# {title}",
        "",
        "## Per-class results (%)",
        "",
        markdown_table(["class", "IoU", "accuracy", "frequency"], class_rows),
        "",
        "## Summary (%)",
        "",
        markdown_table(["figure", "value"], summary[:3]),
        "",
        f"## Fairness over the {int(figures['num_present'])} present classes (%)",
        "",
        markdown_table(["figure", "value"], summary[3 : len(SUMMARY_KEYS)]),
        "",
        f"Classes absent from both labels and predictions are excluded; "
        f"{int(figures['num_pixels'])} labelled pixels.",
        "",
    ]
    if "num_images" in figures:
        parts += [
            f"## Fine-grained IoU over the {int(figures['num_images'])} images (%)",
            "",
            markdown_table(["figure", "value"], summary[len(SUMMARY_KEYS) :]),
            "",
            "Per image, the IoU of each class in its label or prediction (docs/maths.md); "
            "images without a labelled pixel are excluded.",
            "",
        ]
    if extra:
        parts += [
            "## Details",
            "",
            markdown_table(["key", "value"], [[_cell(k), _cell(v)] for k, v in extra.items()]),
            "",
        ]
    md_path = directory / "report.md"
    md_path.write_text("\n".join(parts), encoding="utf-8")
    return os.fspath(md_path), os.fspath(csv_path)


def write_run_reports(
    workdir: str | os.PathLike,
    results: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    title: str,
    extra: Mapping[str, Any],
) -> None:
    """The final files of a run: :func:`write_report` for every split of ``results`` (split ->
    figures; the first split's at the top of ``workdir``, the others under ``<split>/``), and
    ``final_metrics.json`` with every split's :func:`flatten_figures`."""
    # Imported here, as in write_report: the training system's modules.
    from etils import epath

    from tce_jax import workdir as workdir_lib

    root = epath.Path(workdir)
    for i, (split, figures) in enumerate(results.items()):
        write_report(
            root if i == 0 else root / split,
            figures,
            class_names,
            title=f"{title}/{split}",
            extra={**extra, "split": split},
        )
    final = {split: flatten_figures(f, class_names) for split, f in results.items()}
    # Last and atomically: its presence means the run finished (experiments/sweep.py).
    workdir_lib.write_json(root / workdir_lib.FINAL_METRICS_FILE, final)


def format_table(
    figures_by_name: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]
) -> str:
    """Side-by-side markdown table of several runs, e.g. ``{"ce": figs, "tce": figs}``.

    One row per class (IoU) followed by the summary and fairness figures in bold (and the
    fine-grained ones if every run has them); one column per run; percentages with one decimal,
    "n/a" for absent classes.
    """
    if not figures_by_name:
        raise ValueError("figures_by_name is empty: pass at least one run's figures.")
    runs = list(figures_by_name)
    for r in runs:
        names = _check_class_names(figures_by_name[r], class_names)
    rows = [
        [_cell(name)] + [_pct(np.asarray(figures_by_name[r]["iou"])[c]) for r in runs]
        for c, name in enumerate(names)
    ]
    keys = set.intersection(*(set(_summary_keys(figures_by_name[r])) for r in runs))
    for key in (k for k in SUMMARY_KEYS + FINE_GRAINED_KEYS if k in keys):
        rows.append([f"**{_DISPLAY_NAMES[key]}**"] + [_pct(figures_by_name[r][key]) for r in runs])
    return markdown_table(["IoU (%)"] + [_cell(r) for r in runs], rows)
