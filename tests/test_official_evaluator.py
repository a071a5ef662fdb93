"""Our Cityscapes label-id files and IoU agree with the official evaluator.

Ground truth is written in the Cityscapes layout (`gtFine/val/<city>/<city>_<seq>_<frame>_
gtFine_labelIds.png`, small images); predictions in train ids are written by
`tce_jax.predict.PredictionWriter`, which converts them to label ids; cityscapesscripts'
`evalPixelLevelSemanticLabeling` then finds and scores them in-process. Its per-class IoU and
mean must equal ours (`tce_jax.metrics`, on the ground truth mapped to train ids by the
dataset's label map) to 1e-6.
"""

import math
import os

import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as evaluator
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from tce_jax import datasets, metrics, predict
from tce_jax.datasets import cityscapes

SPEC = datasets.get_dataset_spec("cityscapes")
CITIES = ("aachen", "bochum", "frankfurt")
HEIGHT, WIDTH = 24, 40
ABSENT_TRAIN_ID = 16  # "train": neither in the ground truth nor predicted (NaN on both sides)
PREDICTED_ONLY_TRAIN_ID = 17  # "motorcycle": predicted, never in the ground truth (IoU 0)


class NumpyWithIn1d:
    """numpy as the evaluator uses it, with `in1d` (removed in numpy 2.4; deprecated before)
    given by its replacement `isin`; the evaluator reshapes the result itself."""

    in1d = staticmethod(np.isin)

    def __getattr__(self, name):
        return getattr(np, name)


def ground_truth_ids(rng) -> np.ndarray:
    """Label ids 0..33 (every id a uint8 PNG can hold; `license plate` has id -1, which the
    official uint8 files never contain), including the void ones (0 unlabeled, 1 ego vehicle,
    4 static, 5 dynamic, 29 caravan, ...); without the two train ids above."""
    excluded = {
        label.id
        for label in cs_labels.labels
        if label.trainId in (ABSENT_TRAIN_ID, PREDICTED_ONLY_TRAIN_ID)
    }
    allowed = np.array([i for i in range(34) if i not in excluded])
    return rng.choice(allowed, size=(HEIGHT, WIDTH)).astype(np.uint8)


def predicted_train_ids(rng, gt_train_ids) -> np.ndarray:
    """Mostly right (so IoUs are far from 0), otherwise any class but ABSENT_TRAIN_ID."""
    classes = np.array([c for c in range(SPEC.num_classes) if c != ABSENT_TRAIN_ID])
    guess = rng.choice(classes, size=gt_train_ids.shape)
    right = (rng.random(gt_train_ids.shape) < 0.6) & (gt_train_ids != SPEC.ignore_index)
    return np.where(right, gt_train_ids, guess).astype(np.uint8)


def test_train_id_to_label_id_table_inverts_the_label_map():
    to_label_id = predict.cityscapes_label_ids()
    for train_id in range(SPEC.num_classes):
        assert cityscapes.LABEL_MAP[to_label_id[train_id]] == train_id
    assert to_label_id[SPEC.ignore_index] == 0  # "unlabeled"


def test_official_evaluator_agrees_with_our_iou(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    gt_files, ours = [], np.zeros((SPEC.num_classes,) * 2, np.int64)
    ignored_pixels = {}
    writer = predict.PredictionWriter(str(tmp_path / "predictions"), SPEC)
    for city in CITIES:
        os.makedirs(tmp_path / "gtFine" / "val" / city)
        for frame in range(2):
            name = f"{city}_000000_{frame:06d}"
            gt = ground_truth_ids(rng)
            path = str(tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
            Image.fromarray(gt).save(path)
            gt_files.append(path)
            gt_train_ids = SPEC.label_map[gt]
            prediction = predicted_train_ids(rng, gt_train_ids)
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            writer.submit(name, prediction, lambda image=image: image)
            ours += np.asarray(metrics.confusion_matrix(prediction, gt_train_ids, SPEC.num_classes))
            ignored_pixels[name] = int((gt_train_ids == SPEC.ignore_index).sum())
    writer.close()

    # The evaluator's settings for this test only (it keeps them in a module-level object).
    args = evaluator.args
    monkeypatch.setattr(evaluator, "np", NumpyWithIn1d())
    monkeypatch.setattr(args, "predictionPath", str(tmp_path / "predictions" / "labelIds"))
    monkeypatch.setattr(args, "predictionWalk", None)
    monkeypatch.setattr(args, "quiet", True)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "evalInstLevelScore", False)  # needs *_instanceIds.png
    monkeypatch.setattr(args, "evalPixelAccuracy", True)  # the per-image counts below
    # The evaluator finds each prediction by name (<city>_<seq>_<frame>*.png, exactly one).
    predictions = [evaluator.getPrediction(args, f) for f in gt_files]
    assert [os.path.basename(p) for p in predictions] == [
        os.path.basename(f).replace("gtFine_labelIds", "labelIds") for f in gt_files
    ]
    results = evaluator.evaluateImgLists(predictions, gt_files, args)

    figures = metrics.segmentation_figures(ours)
    for train_id, name in enumerate(SPEC.class_names):
        theirs = results["classScores"][name]
        if train_id == ABSENT_TRAIN_ID:
            # Absent from ground truth and predictions: NaN on both sides.
            assert math.isnan(theirs) and math.isnan(figures["iou"][train_id])
            continue
        assert theirs == pytest.approx(figures["iou"][train_id], abs=1e-6), name
    assert results["classScores"]["motorcycle"] == 0.0  # predicted only: counts, as 0
    # Both means skip exactly the NaN classes: the evaluator averages its non-NaN class scores
    # (the void classes are NaN there), ours the classes present in labels or predictions.
    assert figures["num_present"] == SPEC.num_classes - 1
    assert results["averageScoreClasses"] == pytest.approx(figures["miou"], abs=1e-6)
    # With `invert=True`, the evaluator's per-image "nbNotIgnoredPixels" counts the pixels
    # whose label it ignores: our label map ignores the same ones.
    for prediction in predictions:
        name = os.path.basename(prediction).removesuffix("_labelIds.png")
        stats = results["perImageScores"][prediction]
        assert stats["nbNotIgnoredPixels"] == ignored_pixels[name]
