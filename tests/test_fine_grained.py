"""Tests for the fine-grained IoU figures (tce_jax.metrics.fine_grained_figures) against an
independent numpy computation of Wang et al.'s definitions (NeurIPS 2023), and for the
evaluation that produces them: the eval step's per-image counts over the 8 fake devices (jit
over a mesh and pmap) with a padded last batch, collected on the host (train_metrics)."""

import functools
import math
import pathlib
from fractions import Fraction

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tce_jax import metrics, parallel, steps, train_metrics

IGNORE = 255


def _reference(predictions, labels, keep, num_classes):
    """The paper's figures by loops: per kept image with a labelled pixel, the IoU of each class
    in its label or its prediction over the valid pixels; means over images and over classes;
    worst q% with n = max(1, floor(q N / 100)) in exact fractions."""
    image_ious, class_ious = [], {c: [] for c in range(num_classes)}
    for pred, label, kept in zip(predictions, labels, keep, strict=True):
        valid = (label != IGNORE) & (label >= 0) & (label < num_classes)
        if not kept or not valid.any():
            continue
        p, y = pred[valid], label[valid]
        ious = []
        for c in sorted(set(y.tolist()) | set(p.tolist())):
            iou = np.sum((p == c) & (y == c)) / np.sum((p == c) | (y == c))
            ious.append(iou)
            class_ious[c].append(iou)
        image_ious.append(sum(ious) / len(ious))

    def worst(values, q):
        n = max(1, int(Fraction(q * len(values), 100)))
        return sum(sorted(values)[:n]) / n

    def image(q):
        return worst(image_ious, q)

    def per_class(q):
        scored = [v for v in class_ious.values() if v]
        return sum(worst(v, q) for v in scored) / len(scored)

    figures = {"num_images": len(image_ious)}
    for level, figure in (("image", image), ("class", per_class)):
        figures[f"{level}_miou"] = figure(100)
        figures[f"{level}_miou_worst5"] = figure(5)
        figures[f"{level}_miou_qbar"] = sum(figure(q) for q in range(10, 101, 10)) / 10
    return figures


def _counts(predictions, labels, mask, num_classes):
    per_image = metrics.confusion_matrix(
        jnp.asarray(predictions), jnp.asarray(labels), num_classes, mask=mask, per_example=True
    )
    return np.asarray(metrics.class_counts(per_image))


# A hand-made batch of 3 classes. Image 0: class 0 (IoU 1/2), class 1 (IoU 2/4), class 2 only
# predicted (IoU 0); its ignored pixel is predicted 0 and counts nowhere. Image 1: class 2
# (IoU 4/5), class 0 only predicted (IoU 0), class 1 predicted only on an ignored pixel (not
# scored). Image 2: wholly ignored. Image 3: padding (mask False).
HAND_LABELS = np.array(
    [
        [[0, 0, 1], [1, 1, IGNORE]],
        [[2, 2, 2], [2, 2, IGNORE]],
        [[IGNORE] * 3, [IGNORE] * 3],
        [[1, 1, 1], [1, 1, 1]],
    ]
)
HAND_PREDICTIONS = np.array(
    [
        [[0, 1, 1], [1, 2, 0]],
        [[2, 2, 2], [2, 0, 1]],
        [[0, 1, 2], [0, 1, 2]],
        [[0, 0, 0], [0, 0, 0]],
    ]
)
HAND_MASK = np.array([True, True, True, False])


def test_hand_made_counts_and_figures():
    counts = _counts(HAND_PREDICTIONS, HAND_LABELS, HAND_MASK, 3)
    assert counts.shape == (4, 3, 3)
    np.testing.assert_array_equal(counts[0], [[1, 2, 0], [0, 1, 1], [1, 1, 0]])  # TP, FP, FN
    np.testing.assert_array_equal(counts[1], [[0, 0, 4], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(counts[2:], 0)  # wholly ignored; padding
    np.testing.assert_array_equal(
        metrics.image_class_iou(counts), [[0.5, 0.5, 0.0], [0.0, np.nan, 0.8]]
    )
    figures = metrics.fine_grained_figures(counts)
    image_means = (1 / 3, 0.4)  # (1/2 + 2/4 + 0) / 3, (0 + 4/5) / 2
    class_means = (0.25, 0.5, 0.4)  # class 0: 1/2, 0; class 1: 2/4; class 2: 0, 4/5
    assert figures == pytest.approx(
        {
            "num_images": 2,
            "image_miou": sum(image_means) / 2,
            "image_miou_worst5": 1 / 3,  # max(1, floor(5% of 2)) = 1 image
            "image_miou_qbar": (9 / 3 + sum(image_means) / 2) / 10,  # 1 image to q = 90
            "class_miou": sum(class_means) / 3,
            "class_miou_worst5": (0 + 0.5 + 0) / 3,  # each class's worst image
            "class_miou_qbar": (9 * (0 + 0.5 + 0) / 3 + sum(class_means) / 3) / 10,
        }
    )
    expected = _reference(HAND_PREDICTIONS, HAND_LABELS, HAND_MASK, 3)
    assert figures == pytest.approx(expected)
    assert list(figures)[:-1] == list(metrics.FINE_GRAINED_KEYS)


def test_random_images_match_the_reference():
    """Many images, a class absent from every label and prediction, ignored and out-of-range
    labels, a wholly ignored image and padding."""
    num_classes, n = 6, 37
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(n, 5, 4))
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    labels[rng.random(labels.shape) < 0.05] = num_classes + 1
    labels[3] = IGNORE
    predictions = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 5, labels.shape))
    predictions = np.clip(predictions, 0, 4)  # class 5 never labelled nor predicted
    mask = np.arange(n) < n - 4
    figures = metrics.fine_grained_figures(_counts(predictions, labels, mask, num_classes))
    expected = _reference(predictions, labels, mask, num_classes)
    assert expected["num_images"] == n - 5
    assert figures == pytest.approx(expected, rel=1e-12)
    assert figures["image_miou_worst5"] < figures["image_miou"]


def test_worst_mean_counts_exactly():
    assert metrics.worst_mean(np.arange(90.0)[::-1], 70) == np.mean(np.arange(63.0))  # not 62
    assert metrics.worst_mean(np.array([3.0, 1.0, 2.0]), 5) == 1.0  # at least one value
    assert metrics.worst_mean(np.array([3.0, 1.0, 2.0]), 100) == 2.0
    assert math.isnan(metrics.worst_mean(np.array([]), 5))


def test_no_images_gives_nan_figures_and_reports_skip_them():
    figures = train_metrics.Evaluation.empty(2).compute()
    assert figures["num_images"] == 0
    assert all(math.isnan(figures[k]) for k in metrics.FINE_GRAINED_KEYS)
    assert not set(metrics.flatten_figures(figures, ["a", "b"])) & set(metrics.FINE_GRAINED_KEYS)


# ----------------------------------------------------------------------------------------------
# The evaluation: eval step over 8 fake devices, host collection, reports
# ----------------------------------------------------------------------------------------------


class _Echo(nn.Module):
    """Logits whose argmax is the image's first channel: the test chooses the predictions."""

    num_classes: int

    @nn.compact
    def __call__(self, images, train=False):
        return jax.nn.one_hot(images[..., 0].astype(jnp.int32), self.num_classes)


@flax.struct.dataclass
class _State:
    params: dict
    batch_stats: dict


def _eval_batches(num_classes, num_images, batch_size):
    """Label maps and predictions of `num_images` images (one wholly ignored), as batches of the
    input pipeline's eval form, the last padded (mask False, labels ignored)."""
    rng = np.random.default_rng(1)
    shape = (num_images, 6, 5)
    labels = rng.integers(0, num_classes - 1, size=shape)
    labels[rng.random(shape) < 0.15] = IGNORE
    labels[5] = IGNORE
    predictions = np.where(rng.random(shape) < 0.7, labels % num_classes, rng.integers(0, 3, shape))
    total = -(-num_images // batch_size) * batch_size
    pad = [(0, total - num_images), (0, 0), (0, 0)]
    labels = np.pad(labels, pad, constant_values=IGNORE).astype(np.uint8)
    predictions = np.pad(predictions, pad).astype(np.uint8)
    mask = np.arange(total) < num_images
    batches = [
        {
            "image": np.repeat(predictions[i : i + batch_size, ..., None], 3, axis=-1),
            "label": labels[i : i + batch_size],
            "mask": mask[i : i + batch_size],
        }
        for i in range(0, total, batch_size)
    ]
    return batches, predictions, labels, mask


@pytest.mark.parametrize("kind", ["jit", "pmap"])
def test_eval_over_8_devices_with_a_padded_batch_matches_numpy(kind):
    num_classes, num_images = 5, 37
    layout = parallel.MeshParallel() if kind == "jit" else parallel.PmapParallel()
    step = layout.compile_eval(
        functools.partial(
            steps.eval_step,
            model=_Echo(num_classes),
            num_classes=num_classes,
            axis_name=layout.eval_axis_name,
            ignore_index=IGNORE,
            normalise=lambda images: images,
        )
    )
    state = _State(params={}, batch_stats={})
    if kind == "pmap":
        state = layout.device_state(state)
    batches, predictions, labels, mask = _eval_batches(num_classes, num_images, batch_size=16)
    evaluation = train_metrics.Evaluation.empty(num_classes)
    for batch in batches:
        outputs = layout.fetch(step(state, layout.put_batch(batch)))
        assert outputs["image_counts"].shape == (16, 3, num_classes)
        evaluation = evaluation.merge(train_metrics.Evaluation.single_from_model_output(**outputs))
    figures = evaluation.compute()
    expected = _reference(predictions, labels, mask, num_classes)
    assert expected["num_images"] == num_images - 1
    assert {k: figures[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    valid = mask[:, None, None] & (labels != IGNORE)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels[valid], predictions[valid]), 1)
    np.testing.assert_array_equal(figures["confusion"], matrix)


def test_reports_carry_the_fine_grained_figures(tmp_path):
    names = ["a", "b", "c"]
    figures = {
        **metrics.segmentation_figures(np.diag([3, 1, 4])),
        **metrics.fine_grained_figures(_counts(HAND_PREDICTIONS, HAND_LABELS, HAND_MASK, 3)),
    }
    flat = metrics.flatten_figures(figures, names)
    assert flat["image_miou"] == pytest.approx(figures["image_miou"])
    assert set(metrics.FINE_GRAINED_KEYS) <= set(flat)
    assert set(metrics.SUMMARY_KEYS) <= set(flat)
    md_path, _ = metrics.write_report(tmp_path, figures, names, title="t")
    text = pathlib.Path(md_path).read_text()
    assert f"## Fine-grained IoU over the {figures['num_images']} images (%)" in text
    assert "| image-level mIoU (mIoU^I)" in text
    old = metrics.segmentation_figures(np.eye(3))  # e.g. read from an older final_metrics.json
    assert "mIoU^I" not in metrics.format_table({"ce": figures, "old": old}, names)
    assert "**image-level mIoU (mIoU^I)**" in metrics.format_table({"ce": figures}, names)
