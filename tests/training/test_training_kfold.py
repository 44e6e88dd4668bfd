"""Stratified K-fold splits and a (tiny) cross-validation run."""

import numpy as np
import pytest

from napari_sartorius.training.kfold import fold_path, run_kfold, stratified_kfold
from napari_sartorius.training.trainer import TrainSettings, run_training

from conftest import NO_AUG, tiny_config, tiny_dataset


def test_split_is_stratified_partitioning_and_deterministic():
    types = ["shsy5y"] * 7 + ["astro"] * 5 + ["cort"] * 4 + [None] * 2
    folds = stratified_kfold(types, 3, seed=1)
    assert len(folds) == 3
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(len(types)))  # validation folds partition the images
    for tr, va in folds:
        assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(types)
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 1
    for t in ("shsy5y", "astro", "cort", None):
        counts = [sum(types[i] == t for i in va) for _, va in folds]
        assert max(counts) - min(counts) <= 1, (t, counts)
    again = stratified_kfold(types, 3, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = stratified_kfold(types, 3, seed=2)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_bad_fold_counts():
    with pytest.raises(ValueError, match="at least 5 images, got 3"):
        stratified_kfold(["cort"] * 3, 5)
    with pytest.raises(ValueError, match="k >= 2"):
        stratified_kfold(["cort"] * 3, 1)


def test_run_kfold_scores_every_fold(tmp_path):
    data = tiny_dataset(4, styles=("shsy5y", "cort"))
    s = TrainSettings(iters=1, lr=0.005, batch_size=1, warmup_iters=0, augment=NO_AUG, checkpoint_period=0,
                      out=str(tmp_path / "cv.pt"))
    seen = []
    res = run_training(run_kfold(tiny_config(), data, 2, s), seen.append)
    assert res.k == 2 and len(res.folds) == 2 and not res.cancelled
    assert {p.fold for p in seen} == {1, 2} and 0 < seen[-1].fraction <= 1
    for f in res.folds:
        assert f.score is not None and 0.0 <= f.score <= 1.0
        assert set(f.per_class) == {"shsy5y", "cort"}  # one image of each type per fold
        assert f.checkpoint_path == fold_path(tmp_path / "cv.pt", f.fold) and f.checkpoint_path.is_file()
        assert set(f.train_ids).isdisjoint(f.val_ids)
    assert res.mean_score == pytest.approx(np.mean([f.score for f in res.folds]))
    assert "mean" in res.format()
