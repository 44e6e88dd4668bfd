"""The training generator: learns, checkpoints atomically, cancels, resumes, adapts class heads."""

import threading
from pathlib import Path

import pytest
import torch

from napari_sartorius.models.checkpoint import load_checkpoint, save_checkpoint
from napari_sartorius.models.architectures import build_model
from napari_sartorius.training.trainer import (
    TrainingError,
    TrainSettings,
    adapt_num_classes,
    best_path_for,
    lr_at,
    run_training,
    train,
    train_state_path,
)

from conftest import NO_AUG, tiny_config, tiny_dataset


def _settings(tmp_path=None, **kw):
    base = dict(iters=4, lr=0.01, batch_size=1, warmup_iters=2, augment=NO_AUG, checkpoint_period=0)
    if tmp_path is not None:
        base["out"] = str(tmp_path / "model.pt")
    base.update(kw)
    return TrainSettings(**base)


def _collect(gen, on_progress=None):
    progress = []

    def cb(p):
        progress.append(p)
        if on_progress:
            on_progress(p)

    return run_training(gen, cb), progress


def test_learning_rate_schedule():
    s = TrainSettings(iters=100, lr=1.0, warmup_iters=10, warmup_factor=0.1, steps=(0.5, 0.8), gamma=0.1)
    assert lr_at(0, s) == pytest.approx(0.1)
    assert lr_at(5, s) == pytest.approx(0.55)
    assert lr_at(10, s) == pytest.approx(1.0)
    assert lr_at(50, s) == pytest.approx(0.1)
    assert lr_at(80, s) == pytest.approx(0.01)
    c = TrainSettings(iters=100, lr=1.0, warmup_iters=0, schedule="cosine")
    assert lr_at(0, c) == pytest.approx(1.0) and lr_at(50, c) == pytest.approx(0.5) and lr_at(100, c) < 1e-9
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="linear")
    assert TrainSettings.from_dict(s.to_dict()) == s


def test_overfitting_one_image_lowers_the_loss():
    data = tiny_dataset(1)
    res, progress = _collect(train(tiny_config(), data, _settings(iters=16, warmup_iters=3, schedule="constant")))
    losses = res.losses
    assert len(losses) == 16 and res.iterations == 16 and not res.cancelled
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses
    steps = [p for p in progress if p.losses]
    assert [p.iteration for p in steps] == list(range(1, 17))
    assert steps[-1].seconds_left == 0 and steps[5].seconds_left > 0
    assert {"loss_classifier", "loss_mask", "loss_objectness", "total"} <= set(steps[0].losses)


def test_checkpoint_round_trip_with_provenance(tmp_path):
    data = tiny_dataset(2)
    res, _ = _collect(train(tiny_config(), data, _settings(tmp_path, iters=2)))
    assert res.checkpoint_path == tmp_path / "model.pt" and res.best_path is None
    model, config = load_checkpoint(res.checkpoint_path)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v.cpu(), model.state_dict()[k]), k
    prov = config.provenance["training"]
    assert prov["iterations"] == 2 and prov["images"] == 2 and prov["base"].startswith("fresh mask_rcnn_R_50_FPN")
    assert "2 annotated images in memory" in prov["data"]
    assert config.class_names == data.class_names
    assert train_state_path(res.checkpoint_path).is_file()


def test_cancel_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = tiny_dataset(1)
    stop = threading.Event()
    s = _settings(tmp_path, iters=10, checkpoint_period=2, save_on_cancel=False)
    # saving the checkpoint of iteration 4 fails half-way: the one of iteration 2 must survive intact
    import napari_sartorius.models.checkpoint as ckpt

    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == ckpt.CHECKPOINT_FORMAT:
            calls["n"] += 1
            if calls["n"] == 2:
                if hasattr(f, "write"):
                    f.write(b"partial")
                else:  # the atomic writer hands torch.save its temporary path
                    Path(f).write_bytes(b"partial")
                raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        _collect(train(tiny_config(), data, s, stop=stop))
    monkeypatch.setattr(torch, "save", real_save)
    _, config = load_checkpoint(tmp_path / "model.pt")
    assert config.provenance["training"]["iterations"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    # a stop request between iterations: the run ends early, the periodic checkpoint stays
    res, progress = _collect(
        train(tiny_config(), data, _settings(tmp_path / "b", iters=10, checkpoint_period=2, save_on_cancel=False),
              stop=stop),
        on_progress=lambda p: p.iteration == 3 and stop.set(),
    )
    assert res.cancelled and res.iterations == 3
    assert res.checkpoint_path == tmp_path / "b" / "model.pt"
    _, config = load_checkpoint(res.checkpoint_path)
    assert config.provenance["training"]["iterations"] == 2
    assert "Stopped at iteration 3" in progress[-1].message


def test_resume_continues_at_the_right_iteration(tmp_path):
    data = tiny_dataset(2)
    s = _settings(tmp_path, iters=3)
    flag = {"stop": False}
    first, _ = _collect(
        train(tiny_config(), data, s, stop=lambda: flag["stop"]),
        on_progress=lambda p: p.iteration == 1 and flag.update(stop=True),
    )
    assert first.cancelled and first.iterations == 1  # saved on cancel (save_on_cancel=True)
    second, progress = _collect(train(tmp_path / "model.pt", data, s))
    assert any("Resuming" in p.message and "iteration 1 of 3" in p.message for p in progress)
    assert not any("momentum starts from zero" in p.message for p in progress)
    assert [p.iteration for p in progress if p.losses] == [2, 3]
    assert second.iterations == 3 and len(second.history) == 3
    # the same run without interruption gives the same losses (order, seeds and lr depend on the iteration)
    whole, _ = _collect(train(tiny_config(), data, _settings(tmp_path / "w", iters=3)))
    assert second.losses == pytest.approx(whole.losses, rel=1e-3)
    _, cfg = load_checkpoint(tmp_path / "model.pt")
    assert cfg.provenance["training"]["iterations"] == 3


def test_class_count_adaptation_is_reported():
    cfg = tiny_config(class_names=("cort", "astro"))
    torch.manual_seed(0)
    model = build_model(cfg)
    old_cls = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    old_mask = model.roi_heads.mask_predictor.mask_fcn_logits.weight.detach().clone()
    model2, cfg2, msg = adapt_num_classes(model, cfg, ("shsy5y", "astro", "cort"))
    assert cfg2.class_names == ("shsy5y", "astro", "cort") and model2.config.class_names == cfg2.class_names
    assert "2 classes" in msg and "re-initialised for 3" in msg and "new: shsy5y" in msg
    cls = model2.roi_heads.box_predictor.cls_score.weight
    assert cls.shape[0] == 4 and model2.roi_heads.box_predictor.bbox_pred.weight.shape[0] == 16
    assert torch.equal(cls[0], old_cls[0]) and torch.equal(cls[2], old_cls[2]) and torch.equal(cls[3], old_cls[1])
    mask = model2.roi_heads.mask_predictor.mask_fcn_logits.weight
    assert mask.shape[0] == 4 and torch.equal(mask[3], old_mask[1])
    assert adapt_num_classes(model2, cfg2, cfg2.class_names)[2] is None

    res, progress = _collect(train((build_model(cfg), cfg), tiny_dataset(1), _settings(iters=1)))
    assert "re-initialised for 3" in progress[0].message
    assert res.config.class_names == ("shsy5y", "astro", "cort")


def test_out_of_memory_and_divergence_give_clear_errors(monkeypatch):
    data = tiny_dataset(1)
    cfg = tiny_config()
    model = build_model(cfg)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "forward", oom)
    with pytest.raises(TrainingError, match="out of memory.*lower the batch size"):
        run_training(train((model, cfg), data, _settings(iters=2)))

    model = build_model(cfg)
    monkeypatch.setattr(model, "forward", lambda images, targets: {"loss_mask": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(TrainingError, match="loss became nan at iteration 1.*lower the learning rate"):
        run_training(train((model, cfg), data, _settings(iters=2)))


def test_validation_saves_the_best_checkpoint(tmp_path):
    data = tiny_dataset(2)
    res, progress = _collect(train(tiny_config(), data.subset([0]), _settings(tmp_path, iters=2, eval_period=1),
                                   val_data=data.subset([1])))
    assert [it for it, _, _ in res.val_scores] == [1, 2]
    assert all(0.0 <= sc <= 1.0 for _, sc, _ in res.val_scores)
    assert res.best_path == best_path_for(tmp_path / "model.pt") and res.best_path.is_file()
    assert res.best_score == max(sc for _, sc, _ in res.val_scores)
    assert any(p.val_score is not None for p in progress)
    assert set(res.val_scores[0][2]) == {"shsy5y"}


def test_bad_starts_and_settings(tmp_path):
    data = tiny_dataset(1)
    with pytest.raises(TrainingError, match="does not exist"):
        run_training(train(tmp_path / "nope.pt", data, _settings()))
    with pytest.raises(TypeError, match="checkpoint path, a ModelConfig"):
        run_training(train(object(), data, _settings()))
    with pytest.raises(ValueError, match="iters"):
        TrainSettings(iters=0)
    # resuming a checkpoint whose classes differ from the data's is refused (a new run is fine)
    cfg = tiny_config(class_names=("cort",))
    model = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", model, cfg, extra={"train_state": {"iteration": 1, "loss_history": [1.0]}})
    with pytest.raises(TrainingError, match="cannot resume"):
        run_training(train(tmp_path / "c.pt", data, _settings(iters=2)))
    res = run_training(train(tmp_path / "c.pt", data, _settings(iters=1, resume=False)))
    assert res.iterations == 1


def test_training_sizes_go_to_the_model_transform():
    from dataclasses import replace

    from napari_sartorius.training.augment import AugmentationSettings
    from napari_sartorius.training.trainer import _set_train_sizes

    cfg = tiny_config()
    model = build_model(cfg)
    new = _set_train_sizes(model, cfg, TrainSettings(augment=AugmentationSettings(short_edges=(64, 80), max_size=120)))
    assert tuple(model.transform.min_size) == (64, 80) and model.transform.max_size == 120
    assert new.min_size_train == (64, 80) and new.max_size_train == 120
    _set_train_sizes(model, cfg, TrainSettings(augment=replace(AugmentationSettings(), resize=False)))
    assert tuple(model.transform.min_size) == (cfg.min_size_test,)
