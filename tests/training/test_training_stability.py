"""Stable training from a fresh model: FrozenBN calibration, warm-up length, clipping, divergence stops."""

import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_sartorius.models.architectures import build_model
from napari_sartorius.training.trainer import (
    TrainingError,
    TrainSettings,
    calibrated_statistics,
    clip_gradients,
    lr_at,
    prepare_fresh_model,
    run_training,
    train,
    warmup_length,
)

from conftest import NO_AUG, tiny_config, tiny_dataset


def _gains(model):
    return {n: m.weight / torch.sqrt(m.running_var + m.eps) for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def test_calibration_gives_constant_channels_the_identity_and_bounds_the_gain():
    x = torch.randn(2, 6, 8, 8)  # channels 3-5: ordinary
    x[:, 0] = 0.0  # the output of a zero-initialised conv
    x[:, 1] = 3.0  # a constant channel
    x[:, 2] *= 1e-4  # a nearly dead channel
    mean, var = calibrated_statistics(x, eps=1e-5)
    assert mean[0] == 0 and mean[1] == 0 and var[0] == pytest.approx(1 - 1e-5) and var[1] == pytest.approx(1 - 1e-5)
    assert var[3] == pytest.approx(float(x[:, 3].var(unbiased=False)), rel=1e-5)
    typical = float(x[:, 2:].var(dim=(0, 2, 3), unbiased=False).median())  # median of the live channels
    assert var[2] == pytest.approx(1e-2 * typical, rel=1e-4)  # floored at 1 % of the median: gain <= 10x
    assert mean[3] == pytest.approx(float(x[:, 3].mean()), abs=1e-6)


def test_fresh_model_keeps_fixup_branches_at_identity():
    cfg = tiny_config(freeze_at=0)
    model = build_model(cfg)
    prepare_fresh_model(model, [torch.rand(3, 96, 128) * 255])
    gains = _gains(model)
    # the last FrozenBN of every bottleneck follows a zero conv: before the fix its gain was ~300
    last = {n: g for n, g in gains.items() if n.endswith("bn3")}
    assert len(last) == 16
    for n, g in last.items():
        assert torch.allclose(g, torch.ones_like(g), atol=1e-4), n
    assert max(float(g.max()) for g in gains.values()) < 1e3


def test_fresh_whole_body_trains_at_a_normal_learning_rate_without_blowing_up():
    # a random R50-FPN with every stage trainable at lr 0.01: before the fix the second step made
    # the losses ~1e16 and the third NaN
    data = tiny_dataset(1)
    s = TrainSettings(iters=6, lr=0.01, batch_size=1, warmup_iters=1, augment=NO_AUG, checkpoint_period=0,
                      schedule="constant")
    res = run_training(train(tiny_config(freeze_at=0), data, s))
    losses = res.losses
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert max(losses) < 2 * losses[0], losses


def test_warmup_is_a_fraction_of_a_short_run():
    assert warmup_length(TrainSettings(iters=3, warmup_iters=100)) == 1
    assert warmup_length(TrainSettings(iters=50, warmup_iters=100)) == 10
    assert warmup_length(TrainSettings(iters=2000, warmup_iters=100)) == 100
    assert warmup_length(TrainSettings(iters=50, warmup_iters=0)) == 0
    s = TrainSettings(iters=10, lr=1.0, warmup_iters=100, warmup_factor=0.001, schedule="constant")
    assert lr_at(0, s) == pytest.approx(0.001) and lr_at(2, s) == pytest.approx(1.0)


def _with_grads(values):
    ps = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v, dtype=torch.float32)
        ps.append(p)
    return ps


def test_gradient_clipping_types():
    ps = _with_grads([[3.0, 4.0], [0.0, 12.0]])
    assert clip_gradients(ps, None) == pytest.approx(13.0)
    assert ps[0].grad.tolist() == [3.0, 4.0]
    ps = _with_grads([[3.0, 4.0], [0.0, 12.0]])
    assert clip_gradients(ps, 1.3, "full_model") == pytest.approx(13.0)
    assert ps[0].grad.tolist() == pytest.approx([0.3, 0.4], rel=1e-4)
    ps = _with_grads([[3.0, 4.0], [0.0, 12.0]])
    clip_gradients(ps, 1.0, "norm")
    assert ps[0].grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-4) and ps[1].grad.tolist() == pytest.approx([0.0, 1.0], rel=1e-4)
    ps = _with_grads([[3.0, -4.0], [0.5, 12.0]])
    clip_gradients(ps, 1.0, "value")
    assert ps[0].grad.tolist() == [1.0, -1.0] and ps[1].grad.tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="clip_type"):
        TrainSettings(clip_type="global")


def test_an_exploding_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = tiny_dataset(1)
    cfg = tiny_config()
    model = build_model(cfg)
    w = torch.nn.Parameter(torch.ones(()))
    model.register_parameter("probe", w)
    calls = []

    def forward(images, targets):
        calls.append(1)
        value = 2.0 if len(calls) <= 3 else 1e9  # finite, but a billion: diverged
        return {"loss_mask": w * value}

    monkeypatch.setattr(model, "forward", forward)
    out = tmp_path / "m.pt"
    s = TrainSettings(iters=6, lr=1e-6, batch_size=1, augment=NO_AUG, checkpoint_period=2, out=str(out))
    gen = train((model, cfg), data, s)
    with pytest.raises(TrainingError, match=r"loss exploded to 1e\+09 \(it started near 2\) at iteration 4.*last good checkpoint is kept"):
        run_training(gen)
    from napari_sartorius.models.checkpoint import read_checkpoint

    assert read_checkpoint(out)[2]["train_state"]["iteration"] == 2  # the good one, not overwritten


def test_non_finite_gradients_stop_before_the_step(monkeypatch):
    data = tiny_dataset(1)
    cfg = tiny_config()
    model = build_model(cfg)
    w = torch.nn.Parameter(torch.zeros(()))
    model.register_parameter("probe", w)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # sqrt at 0: a finite loss (0) whose gradient is infinite
    monkeypatch.setattr(model, "forward", lambda images, targets: {"loss_mask": torch.sqrt(w)})
    s = TrainSettings(iters=2, lr=0.1, batch_size=1, augment=NO_AUG, checkpoint_period=0)
    with pytest.raises(TrainingError, match="gradients became inf at iteration 1"):
        run_training(train((model, cfg), data, s))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
