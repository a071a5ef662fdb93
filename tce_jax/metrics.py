"""Segmentation metrics: a CLU confusion-matrix metric, per-class IoU and fairness figures.

The evaluation accumulates one ``[C, C]`` confusion matrix (rows = true class, columns =
predicted class) over the *whole* split, then derives every figure from it on the host:

* :class:`ConfusionMatrix` — a ``clu.metrics.Metric`` built inside the jitted eval step;
  ``merge`` adds matrices (steps), ``reduce`` sums a leading axis (devices, after an
  ``all_gather``), :meth:`ConfusionMatrix.psum` all-reduces inside ``pmap``/``shard_map``.
* :func:`segmentation_figures` — pixel/mean-class accuracy, per-class IoU, mIoU and the fairness
  figures (IoU std, worst-class IoU, worst-25% mIoU, max-min gap), in float64 numpy.
* :func:`flatten_figures`, :func:`write_report`, :func:`format_table` — scalars for metric
  writers, ``report.md``/``per_class.csv`` for a workdir, a CE-vs-TCE comparison table.

Usage with ``jax.jit`` over a device mesh (batch sharded on the data axis): call
``ConfusionMatrix.from_model_output`` once on the global batch; XLA reduces across devices::

    @jax.jit
    def eval_step(params, batch):
        logits = model.apply(params, batch["image"])
        return ConfusionMatrix.from_model_output(
            logits=logits, labels=batch["label"], mask=batch["mask"])

    metric = ConfusionMatrix.empty(num_classes)
    for batch in eval_batches:  # the padded last batch is masked, never dropped
        metric = metric.merge(eval_step(params, batch))
    figures = metric.compute()

Usage with ``jax.pmap(axis_name="batch")``: build the per-device metric, then all-reduce it so
that every device holds the global matrix, and take one replica outside::

    def eval_step(params, batch):
        logits = model.apply(params, batch["image"])
        return ConfusionMatrix.from_model_output(
            logits=logits, labels=batch["label"], mask=batch["mask"]).psum("batch")

    metric = metric.merge(flax.jax_utils.unreplicate(jax.pmap(eval_step, "batch")(p, b)))

Inside a ``clu.metrics.Collection`` use ``ConfusionMatrix.with_num_classes(C)`` as the field type
(so ``Collection.empty()`` works); ``Collection.gather_from_model_output(axis_name="batch", ...)``
then does the same all-gather + ``reduce`` under ``pmap``. A Collection hands the same ``mask`` to
every metric, so there pass a per-example ``[B]`` mask (which CLU's ``Average`` accepts too) and
put per-pixel exclusions into the labels as ``ignore_index``.

Counts are int32 and exact up to 2**31 - 1 pixels per cell (float32 counts would lose exactness
past 2**24 = 16.7M pixels, i.e. about eight 1024x2048 Cityscapes images). For longer
accumulations merge on the host: ``ConfusionMatrix.merge`` switches to int64 numpy as soon as one
side is a numpy array, e.g. ``ConfusionMatrix.empty(C, host=True).merge(jax.device_get(update))``.
"""

import csv
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import clu.metrics
import clu.values
import flax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "segmentation_figures",
    "flatten_figures",
    "write_report",
    "format_table",
    "SUMMARY_KEYS",
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
}


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

    Returns:
      ``[C, C]`` int32 matrix ``M[i, j] = #{valid pixels with label i predicted as j}``, valid
      meaning ``label != ignore_index``, ``0 <= label < C`` and ``mask`` true. Built with one
      ``segment_sum`` over ``label * C + prediction`` (no ``[pixels, C, C]`` one-hot), so it is
      cheap on full-resolution images and partitions under ``jit`` with sharded inputs.
    """
    predictions = jnp.asarray(predictions)
    labels = jnp.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must have the same shape."
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
    counts = jax.ops.segment_sum(
        valid.astype(jnp.int32).ravel(), ids.ravel(), num_segments=num_classes * num_classes
    )
    return counts.reshape(num_classes, num_classes)


def _broadcast_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Broadcasts a per-example (prefix-shaped) or per-pixel mask to ``shape``, as bool."""
    if mask.shape != tuple(shape[: mask.ndim]):
        raise ValueError(
            f"mask has shape {mask.shape} but labels have shape {tuple(shape)}: pass a "
            "per-example mask of shape [B] or a per-pixel mask of the labels' shape."
        )
    mask = mask.astype(bool).reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return jnp.broadcast_to(mask, shape)


def _is_host_array(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


@flax.struct.dataclass
class ConfusionMatrix(clu.metrics.Metric):
    """CLU metric holding a ``[C, C]`` confusion matrix (rows = true class, cols = predicted).

    ``matrix`` is int32 (exact to 2**31 - 1 per cell) when built on device; a host-side
    accumulation (numpy) is int64. ``compute()`` returns the dict of
    :func:`segmentation_figures`; ``compute_value()`` (used by ``Collection.compute_values``)
    returns the mIoU as a ``clu.values.Scalar``.

    ``num_classes`` is a class-level default for :meth:`empty`, set by :meth:`with_num_classes`
    (``clu.metrics.Collection.empty()`` calls ``empty()`` without arguments).
    """

    matrix: jax.Array

    num_classes: ClassVar[int | None] = None

    @classmethod
    def with_num_classes(cls, num_classes: int) -> type["ConfusionMatrix"]:
        """Returns a subclass whose ``empty()`` needs no argument, for use in a ``Collection``.

        The subclass is cached, so the same ``num_classes`` gives the same class (and the same
        pytree type: no recompilation of jitted steps that return it).
        """
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if cls.num_classes == int(num_classes):
            return cls
        return _bound_confusion_class(cls, int(num_classes))

    @classmethod
    def from_model_output(
        cls,
        *,
        logits: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
        ignore_index: int | None = 255,
        **_: Any,
    ) -> "ConfusionMatrix":
        """Confusion matrix of ``argmax(logits, -1)`` against ``labels``.

        Args:
          logits: ``[..., C]`` (e.g. ``[B, H, W, C]``); C is read from the last axis.
          labels: ``[...]`` integer labels (e.g. ``[B, H, W]``), any integer dtype.
          mask: optional; ``[B]`` per example (padding of the last eval batch) or
            ``[B, H, W]`` per pixel; False excludes the example/pixel.
          ignore_index: label excluded from the counts (default 255). Labels outside
            ``[0, C)`` are excluded as well.
          **_: other model outputs (a ``Collection`` passes every output to every metric).

        Returns:
          A ``ConfusionMatrix`` with an int32 ``[C, C]`` matrix. Works under ``jit`` (on the
          global, sharded batch) and inside ``pmap`` (per device; then :meth:`psum`).
        """
        logits = jnp.asarray(logits)
        labels = jnp.asarray(labels)
        if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {logits.shape} must be labels {labels.shape} plus a trailing class "
                "axis (e.g. logits [B, H, W, C] with labels [B, H, W]); squeeze a trailing "
                "label axis of size 1 first."
            )
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
        num_classes = logits.shape[-1]
        if cls.num_classes is not None and cls.num_classes != num_classes:
            raise ValueError(
                f"{cls.__name__} is bound to {cls.num_classes} classes but the logits have "
                f"{num_classes}."
            )
        predictions = jnp.argmax(logits, axis=-1)
        return cls(
            matrix=confusion_matrix(
                predictions, labels, num_classes, mask=mask, ignore_index=ignore_index
            )
        )

    @classmethod
    def empty(cls, num_classes: int | None = None, *, host: bool = False) -> "ConfusionMatrix":
        """All-zero matrix: ``empty(C).merge(m) == m``.

        Args:
          num_classes: C; defaults to the class-level ``num_classes`` (see
            :meth:`with_num_classes`).
          host: if True, an int64 numpy matrix, so that merges accumulate on the host without
            the int32 limit.
        """
        if num_classes is None:
            num_classes = cls.num_classes
        if num_classes is None:
            raise ValueError(
                "ConfusionMatrix.empty() needs the number of classes: call "
                "ConfusionMatrix.empty(num_classes), or use "
                "ConfusionMatrix.with_num_classes(num_classes) as the Collection field type."
            )
        shape = (int(num_classes), int(num_classes))
        if host:
            return cls(matrix=np.zeros(shape, np.int64))
        return cls(matrix=jnp.zeros(shape, jnp.int32))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Adds the two matrices (accumulation over eval steps).

        If either matrix is a numpy array and neither is traced, the sum is an int64 numpy
        array (host-side accumulation); otherwise a jax array of the operands' dtype.
        """
        a, b = self.matrix, other.matrix
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"Cannot merge confusion matrices of shapes {np.shape(a)} and {np.shape(b)} "
                "(different numbers of classes, or a per-device axis not reduced)."
            )
        if (_is_host_array(a) or _is_host_array(b)) and not (_is_tracer(a) or _is_tracer(b)):
            return type(self)(matrix=np.asarray(a, np.int64) + np.asarray(b, np.int64))
        return type(self)(matrix=jnp.asarray(a) + jnp.asarray(b))

    def reduce(self) -> "ConfusionMatrix":
        """Sums over the leading axis, e.g. the device axis after ``jax.lax.all_gather``."""
        if np.ndim(self.matrix) != 3:
            raise ValueError(
                f"reduce() expects a stacked [N, C, C] matrix, got shape {np.shape(self.matrix)}."
            )
        return type(self)(matrix=self.matrix.sum(axis=0))

    def psum(self, axis_name: str = "batch") -> "ConfusionMatrix":
        """All-reduces the matrix over a named axis (inside ``pmap``/``shard_map``).

        Cheaper than ``all_gather`` + :meth:`reduce` (no ``[devices, C, C]`` intermediate);
        afterwards every device holds the global matrix.
        """
        return type(self)(matrix=jax.lax.psum(self.matrix, axis_name))

    def compute(self) -> dict[str, Any]:
        """Fetches the matrix to the host and returns :func:`segmentation_figures` of it."""
        matrix = np.asarray(jax.device_get(self.matrix))
        if matrix.ndim != 2:
            raise ValueError(
                f"compute() needs one [C, C] matrix, got shape {matrix.shape}: reduce the "
                "device axis first (psum/all_gather + reduce inside pmap, then unreplicate)."
            )
        return segmentation_figures(matrix)

    def compute_value(self) -> clu.values.Value:
        """The mIoU as a scalar (``Collection.compute_values``); see :func:`flatten_figures`."""
        return clu.values.Scalar(self.compute()["miou"])


@functools.cache
def _bound_confusion_class(base: type[ConfusionMatrix], num_classes: int) -> type:
    sub = type(
        f"{base.__name__}{num_classes}",
        (base,),
        {"num_classes": num_classes, "__module__": base.__module__},
    )
    return flax.struct.dataclass(sub)


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
    [0, 1]). Classes absent from labels and predictions are omitted, and so is any summary
    figure that is NaN (only for an all-zero matrix), so the result is NaN-free.
    """
    names = _check_class_names(figures, class_names)
    flat: dict[str, float] = {}
    for key in SUMMARY_KEYS:
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


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A padded markdown table; columns from index ``right`` on are right-aligned."""
    widths = [max(3, len(h)) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < right else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i < right else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join(
        [line(header), "|" + "|".join(f" {r} " for r in rule) + "|"] + [line(r) for r in rows]
    )


def _summary_rows(figures: Mapping[str, Any], names: Sequence[str]) -> list[list[str]]:
    worst = int(figures["worst_class"])
    worst_name = f" ({names[worst]})" if worst >= 0 else ""
    k = int(figures["worst25_count"])
    rows = []
    for key in SUMMARY_KEYS:
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
    names = _check_class_names(figures, class_names)
    os.makedirs(workdir, exist_ok=True)
    iou = np.asarray(figures["iou"], np.float64)
    acc = np.asarray(figures["accuracy"], np.float64)
    freq = np.asarray(figures["frequency"], np.float64)

    csv_path = os.path.join(workdir, "per_class.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou", "accuracy", "frequency"])
        for row in zip(names, iou, acc, freq, strict=True):
            writer.writerow([row[0], *(repr(float(v)) for v in row[1:])])

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
        _markdown_table(["class", "IoU", "accuracy", "frequency"], class_rows),
        "",
        "## Summary (%)",
        "",
        _markdown_table(["figure", "value"], summary[:3]),
        "",
        f"## Fairness over the {int(figures['num_present'])} present classes (%)",
        "",
        _markdown_table(["figure", "value"], summary[3:]),
        "",
        f"Classes absent from both labels and predictions are excluded; "
        f"{int(figures['num_pixels'])} labelled pixels.",
        "",
    ]
    if extra:
        parts += [
            "## Details",
            "",
            _markdown_table(["key", "value"], [[_cell(k), _cell(v)] for k, v in extra.items()]),
            "",
        ]
    md_path = os.path.join(workdir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return md_path, csv_path


def format_table(
    figures_by_name: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]
) -> str:
    """Side-by-side markdown table of several runs, e.g. ``{"ce": figs, "tce": figs}``.

    One row per class (IoU) followed by the summary and fairness figures in bold; one column per
    run; percentages with one decimal, "n/a" for absent classes.
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
    for key in SUMMARY_KEYS:
        rows.append([f"**{_DISPLAY_NAMES[key]}**"] + [_pct(figures_by_name[r][key]) for r in runs])
    return _markdown_table(["IoU (%)"] + [_cell(r) for r in runs], rows)
