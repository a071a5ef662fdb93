"""Tests for tce_jax.metrics: confusion matrix (jit, sharded jit, pmap), figures, reports; and
the CLU metrics the trainer builds on them (tce_jax.train_metrics)."""

import csv
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tce_jax import metrics, train_metrics

C = 5
IGNORE = 255


# ----------------------------------------------------------------------------------------------
# Fixtures and the numpy reference
# ----------------------------------------------------------------------------------------------


def _reference_confusion(logits, labels, num_classes, mask=None, ignore_index=IGNORE):
    """Plain numpy: loop-free but independent of the jax code (np.add.at over valid pixels)."""
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels).astype(np.int64)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    if mask is not None:
        mask = np.asarray(mask, bool)
        valid &= mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (labels[valid], preds[valid]), 1)
    return out


def _reference_confusion_loops(preds, labels, num_classes, valid):
    """Explicit python loops, for a tiny case."""
    out = np.zeros((num_classes, num_classes), np.int64)
    for p, y, v in zip(preds.ravel(), labels.ravel(), valid.ravel(), strict=True):
        if v:
            out[y, p] += 1
    return out


def _batch(seed, b=8, h=6, w=5, num_classes=C):
    """Random logits/labels with ignore pixels and out-of-range labels, and both mask kinds."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, h, w, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(b, h, w)).astype(np.int32)
    special = rng.random((b, h, w))
    labels[special < 0.10] = IGNORE
    labels[(special >= 0.10) & (special < 0.13)] = -1
    labels[(special >= 0.13) & (special < 0.16)] = num_classes  # just out of range
    labels[(special >= 0.16) & (special < 0.18)] = num_classes + 7
    example_mask = np.ones(b, bool)
    example_mask[-3:] = False  # padding of a last eval batch
    pixel_mask = rng.random((b, h, w)) > 0.2
    return logits, labels, example_mask, pixel_mask


@pytest.fixture(scope="module")
def batch():
    return _batch(0)


def _mask(kind, example_mask, pixel_mask):
    return {"none": None, "example": example_mask, "pixel": pixel_mask}[kind]


# ----------------------------------------------------------------------------------------------
# confusion_matrix
# ----------------------------------------------------------------------------------------------


def _confusion(logits, labels, mask=None, ignore_index=IGNORE, num_classes=C):
    return metrics.confusion_matrix(
        jnp.asarray(logits).argmax(-1), labels, num_classes, mask=mask, ignore_index=ignore_index
    )


def test_tiny_case_against_python_loops():
    preds = np.array([[[0, 1, 2], [2, 2, 0]]])
    labels = np.array([[[0, 1, 255], [2, 5, 1]]], np.int32)
    valid = np.array([[[1, 1, 0], [1, 0, 1]]], bool)
    got = metrics.confusion_matrix(preds, labels, 3)
    np.testing.assert_array_equal(got, _reference_confusion_loops(preds, labels, 3, valid))
    np.testing.assert_array_equal(got, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])


@pytest.mark.parametrize("mask_kind", ["none", "example", "pixel"])
def test_matches_numpy_reference(batch, mask_kind):
    logits, labels, example_mask, pixel_mask = batch
    mask = _mask(mask_kind, example_mask, pixel_mask)
    got = jax.jit(_confusion)(logits, labels, mask)
    assert got.shape == (C, C)
    assert got.dtype == jnp.int32
    expected = _reference_confusion(logits, labels, C, mask)
    np.testing.assert_array_equal(got, expected)
    # Loop reference on the same data agrees with the np.add.at reference.
    preds = logits.argmax(-1)
    valid = (labels != IGNORE) & (labels >= 0) & (labels < C)
    if mask is not None:
        valid &= np.asarray(mask).reshape(mask.shape + (1,) * (3 - mask.ndim))
    np.testing.assert_array_equal(expected, _reference_confusion_loops(preds, labels, C, valid))


def test_uint8_labels_do_not_wrap():
    # 19 classes: label * C + pred reaches 360, beyond uint8.
    num_classes = 19
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8, 8, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(2, 8, 8)).astype(np.uint8)
    labels[0, 0] = IGNORE
    got = _confusion(logits, jnp.asarray(labels), num_classes=num_classes)
    np.testing.assert_array_equal(got, _reference_confusion(logits, labels, num_classes))


def test_custom_ignore_index_and_bf16_logits(batch):
    logits, labels, _, _ = batch
    labels = np.where(labels == IGNORE, 0, labels)  # 255 is now just out of range
    got = _confusion(jnp.asarray(logits, jnp.bfloat16), labels, ignore_index=2)
    lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(got, _reference_confusion(lg, labels, C, ignore_index=2))


def test_sum_of_batches_equals_one_batch(batch):
    logits, labels, example_mask, pixel_mask = batch
    mask = pixel_mask & example_mask[:, None, None]
    whole = _confusion(logits, labels, mask)
    total = train_metrics.ConfusionMatrix.empty(C)  # the host accumulation of the eval loop
    for sl in (slice(0, 3), slice(3, 5), slice(5, 8)):
        batch_matrix = _confusion(logits[sl], labels[sl], mask[sl])
        total = total.merge(train_metrics.ConfusionMatrix.from_model_output(batch_matrix))
    np.testing.assert_array_equal(total.matrix, whole)
    figures = total.compute()
    np.testing.assert_array_equal(figures.pop("confusion"), whole)
    expected = metrics.segmentation_figures(np.asarray(whole))
    assert figures.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(figures[key], value)


def test_confusion_matrix_metric_counts_exactly_beyond_int32():
    big = np.full((2, 2), 2**31 - 1, np.int32)  # one batch's int32 matrix at its limit
    total = train_metrics.ConfusionMatrix.empty(2)
    for _ in range(3):
        total = total.merge(train_metrics.ConfusionMatrix.from_model_output(big))
    assert total.matrix.dtype == np.int64
    np.testing.assert_array_equal(total.matrix, np.full((2, 2), 3 * (2**31 - 1), np.int64))


def test_train_figures_average_over_steps_per_class():
    """The compiled step's Collection, fetched and merged on the host: every figure averaged
    over the steps in its own shape, the learning rate that of the last step."""

    def fake_step(state, batch):
        step_metrics = {"loss": batch.mean(), "class_loss": batch, "num_invalid": jnp.int32(2)}
        return state, step_metrics

    step = jax.jit(train_metrics.collecting(fake_step, lambda count: 0.1 * count))
    batches = [jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 4.0, 5.0]), jnp.array([5.0, 0.0, 1.0])]
    total = None
    state = FakeState(step=jnp.int32(0))
    for batch in batches:
        _, figures = step(state, batch)
        figures = jax.device_get(figures)
        total = figures if total is None else total.merge(figures)
        state = FakeState(step=state.step + 1)
    computed = total.compute()
    np.testing.assert_allclose(computed["class_loss"], [3.0, 2.0, 3.0])
    np.testing.assert_allclose(computed["loss"], 8.0 / 3)
    np.testing.assert_allclose(computed["num_invalid"], 2.0)
    np.testing.assert_allclose(computed["learning_rate"], 0.2)
    scalars = train_metrics.train_scalars(computed, ["a", "b", "c"])
    assert scalars.keys() == {
        "train/loss",
        "train/num_invalid",
        "train/learning_rate",
        "train/class_loss/a",
        "train/class_loss/b",
        "train/class_loss/c",
    }
    assert scalars["train/class_loss/b"] == pytest.approx(2.0)


@flax.struct.dataclass
class FakeState:
    step: jax.Array


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0m00s"), (-5, "0m00s"), (65.9, "1m05s"), (3599, "59m59s"), (3720, "1h02m")],
)
def test_format_duration(seconds, text):
    assert train_metrics.format_duration(seconds) == text


@pytest.mark.parametrize("mask_kind", ["example", "pixel"])
def test_jit_on_sharded_global_arrays_matches_one_device(batch, mask_kind):
    logits, labels, example_mask, pixel_mask = batch
    mask = _mask(mask_kind, example_mask, pixel_mask)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(x, sharded) for x in (logits, labels, mask)]
    assert len(args[0].sharding.device_set) == 4
    got = jax.jit(_confusion)(*args)
    one_device = jax.jit(_confusion)(
        *(jax.device_put(x, jax.devices()[0]) for x in (logits, labels, mask))
    )
    np.testing.assert_array_equal(got, one_device)
    np.testing.assert_array_equal(got, _reference_confusion(logits, labels, C, mask))


def test_pmap_psum_matches_one_device(batch):
    logits, labels, example_mask, pixel_mask = batch
    mask = pixel_mask & example_mask[:, None, None]
    split = [x.reshape((4, -1) + x.shape[1:]) for x in (logits, labels, example_mask, mask)]

    def step(lg, y, em, pm):
        # Per-example and per-pixel masks; with ~em the two per-example halves cover all.
        m = _confusion(lg, y, em) + _confusion(lg, y, pm) + _confusion(lg, y, ~em)
        return jax.lax.psum(m, "batch")

    out = jax.pmap(step, axis_name="batch", devices=jax.devices()[:4])(*split)
    assert out.shape == (4, C, C)
    expected = _reference_confusion(logits, labels, C) + _reference_confusion(
        logits, labels, C, mask
    )
    for d in range(4):  # every device holds the global matrix
        np.testing.assert_array_equal(out[d], expected)


def test_bad_inputs_raise_clear_errors():
    preds = np.zeros((2, 3, 3), np.int32)
    labels = np.zeros((2, 3, 3), np.int32)
    with pytest.raises(ValueError, match="per-example mask"):
        metrics.confusion_matrix(preds, labels, C, mask=np.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion_matrix(preds, labels[..., None], C)
    with pytest.raises(ValueError, match="integers"):
        metrics.confusion_matrix(preds, labels.astype(float), C)
    with pytest.raises(ValueError, match="argmax"):
        logits = np.zeros((2, 3, 3, C), np.float32)
        metrics.confusion_matrix(logits, labels[..., None].repeat(C, -1), C)
    with pytest.raises(ValueError, match="square"):
        metrics.segmentation_figures(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.segmentation_figures(-np.eye(2))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

# rows = true class, cols = predicted.
HAND = np.array(
    [
        [5, 1, 0],
        [2, 3, 1],
        [0, 0, 4],
    ]
)
# TP = (5, 3, 4), label pixels G = (6, 6, 4), predicted pixels P = (7, 4, 5), N = 16.
HAND_IOU = np.array([5 / (6 + 7 - 5), 3 / (6 + 4 - 3), 4 / (4 + 5 - 4)])  # 5/8, 3/7, 4/5
HAND_ACC = np.array([5 / 6, 3 / 6, 4 / 4])


def test_figures_hand_computed_3x3():
    f = metrics.segmentation_figures(HAND)
    np.testing.assert_allclose(f["iou"], [0.625, 3 / 7, 0.8])
    np.testing.assert_allclose(f["iou"], HAND_IOU)
    np.testing.assert_allclose(f["accuracy"], HAND_ACC)
    np.testing.assert_allclose(f["frequency"], [6 / 16, 6 / 16, 4 / 16])
    assert f["pixel_accuracy"] == pytest.approx(12 / 16)
    assert f["mean_accuracy"] == pytest.approx(7 / 9)  # (5/6 + 1/2 + 1) / 3
    miou = 519 / 840  # (5/8 + 3/7 + 4/5) / 3 = (175 + 120 + 224) / 280 / 3
    assert f["miou"] == pytest.approx(miou)
    # Population std (ddof=0), written out.
    var = ((5 / 8 - miou) ** 2 + (3 / 7 - miou) ** 2 + (4 / 5 - miou) ** 2) / 3
    assert f["iou_std"] == pytest.approx(math.sqrt(var))
    assert f["iou_std"] == pytest.approx(0.151720, abs=1e-6)
    assert f["worst_iou"] == pytest.approx(3 / 7)
    assert f["worst_class"] == 1
    assert f["worst25_count"] == 1  # ceil(0.25 * 3)
    assert f["worst25_miou"] == pytest.approx(3 / 7)
    assert f["iou_gap"] == pytest.approx(4 / 5 - 3 / 7)  # 13/35
    assert f["num_present"] == 3 and f["num_classes"] == 3 and f["num_pixels"] == 16
    assert f["present"].all()
    # Integer and float matrices give the same figures.
    g = metrics.segmentation_figures(HAND.astype(np.float32))
    assert g["miou"] == f["miou"]


def test_absent_classes_are_excluded():
    # Class 3 is absent from labels and predictions; class 4 is predicted but never labelled.
    m = np.zeros((5, 5), np.int64)
    m[:3, :3] = HAND
    m[0, 4] = 2  # two class-0 pixels predicted as class 4
    f = metrics.segmentation_figures(m)
    assert np.isnan(f["iou"][3]) and np.isnan(f["accuracy"][3])
    assert list(f["present"]) == [True, True, True, False, True]
    assert f["num_present"] == 4
    # Class 0: TP 5, G 8, P 7 -> 5/10; class 4: IoU 0 (counted); accuracy undefined.
    iou = [5 / 10, 3 / 7, 4 / 5, 0.0]
    np.testing.assert_allclose(f["iou"][[0, 1, 2, 4]], iou)
    assert np.isnan(f["accuracy"][4])
    assert f["miou"] == pytest.approx(np.mean(iou))
    assert f["mean_accuracy"] == pytest.approx((5 / 8 + 3 / 6 + 1) / 3)
    assert f["iou_std"] == pytest.approx(np.std(iou))
    assert f["worst_iou"] == 0.0 and f["worst_class"] == 4
    assert f["iou_gap"] == pytest.approx(0.8)
    assert f["frequency"][3] == 0.0 and f["frequency"][4] == 0.0
    flat = metrics.flatten_figures(f, list("abcde"))
    assert "iou/d" not in flat and flat["iou/e"] == 0.0
    assert not any(math.isnan(v) for v in flat.values())


def test_worst25_with_five_classes():
    m = np.array(
        [
            [4, 0, 0, 0, 0],
            [0, 3, 1, 0, 0],
            [0, 1, 2, 0, 0],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 3],
        ]
    )
    # IoU: 4/4, 3/(4+4-3), 2/(3+3-2), 1/(2+2-1), 3/(4+4-3) = 1, 3/5, 1/2, 1/3, 3/5.
    f = metrics.segmentation_figures(m)
    np.testing.assert_allclose(f["iou"], [1.0, 0.6, 0.5, 1 / 3, 0.6])
    assert f["worst25_count"] == 2  # ceil(0.25 * 5)
    assert f["worst25_miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert f["worst_iou"] == pytest.approx(1 / 3) and f["worst_class"] == 3
    assert f["iou_gap"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (19, 5)])
def test_worst25_count(n, k):
    m = np.diag(np.arange(1, n + 1))
    m = np.pad(m, (0, 2))  # two absent classes do not count
    assert metrics.segmentation_figures(m)["worst25_count"] == k


def test_empty_matrix_gives_nan_and_flatten_drops_it():
    f = metrics.segmentation_figures(np.zeros((3, 3)))
    assert math.isnan(f["miou"]) and math.isnan(f["pixel_accuracy"])
    assert f["worst_class"] == -1 and f["num_present"] == 0 and f["num_pixels"] == 0
    assert metrics.flatten_figures(f, ["a", "b", "c"]) == {}


def test_flatten_figures():
    f = metrics.segmentation_figures(HAND)
    flat = metrics.flatten_figures(f, ["road", "pole", "sky"])
    assert set(flat) == set(metrics.SUMMARY_KEYS) | {"iou/road", "iou/pole", "iou/sky"}
    assert flat["iou/pole"] == pytest.approx(3 / 7)
    assert all(type(v) is float for v in flat.values())
    with pytest.raises(ValueError, match="class_names"):
        metrics.flatten_figures(f, ["road", "pole"])


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def test_write_report(tmp_path):
    m = np.zeros((4, 4), np.int64)
    m[:3, :3] = HAND
    f = metrics.segmentation_figures(m)
    workdir = tmp_path / "nested" / "run"
    md_path, csv_path = metrics.write_report(
        workdir, f, ["road", "pole", "sky", "rider"], title="TCE t=1", extra={"step": 1000}
    )
    assert md_path == str(workdir / "report.md") and csv_path == str(workdir / "per_class.csv")

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["class", "iou", "accuracy", "frequency"]
    assert [r[0] for r in rows[1:]] == ["road", "pole", "sky", "rider"]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:4]], HAND_IOU)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:4]], HAND_ACC)
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], [6 / 16, 6 / 16, 4 / 16, 0])
    assert math.isnan(float(rows[4][1])) and math.isnan(float(rows[4][2]))

    text = (workdir / "report.md").read_text(encoding="utf-8")
    assert text.startswith("# TCE t=1\n")
    lines = text.splitlines()
    assert any(
        line.split("|")[1:5] == [" road  ", " 62.5 ", "     83.3 ", "      37.5 "] for line in lines
    )
    for name in ("road", "pole", "sky", "rider"):
        assert f"| {name}" in text
    assert "n/a" in text  # rider: absent
    assert "61.8" in text  # mIoU 519/840
    assert "75.0" in text  # pixel accuracy
    assert "77.8" in text  # mean class accuracy
    assert "15.2" in text  # IoU std
    assert "42.9 (pole)" in text  # worst class
    assert "37.1" in text  # gap 13/35
    assert "3 present classes" in text
    assert "| step" in text and "1000" in text


def test_format_table_contains_every_class_and_run():
    names = ["road", "pole", "sky"]
    ce = metrics.segmentation_figures(HAND)
    tce = metrics.segmentation_figures(np.diag([3, 3, 3]))
    table = metrics.format_table({"ce": ce, "tce": tce}, names)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[1:] == ["ce", "tce"]
    body = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
    }
    for name in names:
        assert name in body
    assert body["road"] == ["62.5", "100.0"]
    assert body["pole"] == ["42.9", "100.0"]
    assert body["**mIoU**"] == ["61.8", "100.0"]
    assert body["**worst-class IoU**"] == ["42.9", "100.0"]
    assert body["**max-min IoU gap**"] == ["37.1", "0.0"]
    assert len(lines) == 2 + len(names) + len(metrics.SUMMARY_KEYS)
    with pytest.raises(ValueError, match="class_names"):
        metrics.format_table({"ce": ce}, names[:2])
