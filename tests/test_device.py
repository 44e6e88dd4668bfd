import pytest
import torch

from napari_sartorius import device as device_mod
from napari_sartorius.device import (
    autocast_context,
    is_out_of_memory,
    resolve_device,
    run_with_oom_fallback,
)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda t: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device_mod, "_mps_available", lambda t: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("AUTO") == torch.device("cuda")


def test_explicit_devices_and_clear_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda t: False)
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 1 CUDA"):
        resolve_device("cuda:3")


def test_autocast_is_fp16_on_cuda_only():
    ctx = autocast_context(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    with autocast_context("cpu"):
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.float32
    assert not isinstance(autocast_context("cuda", enabled=False), torch.autocast)


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_oom_falls_back_to_cpu_and_tells_the_user(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    emptied = []
    monkeypatch.setattr(device_mod, "empty_cache", lambda: emptied.append(True))
    calls, messages = [], []

    def work(dev):
        calls.append(dev.type)
        if dev.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return "done"

    out = run_with_oom_fallback(work, "cuda", on_fallback=messages.append, what="while running model 1")
    assert out == "done"
    assert calls == ["cuda", "cpu"]
    assert emptied == [True]
    assert len(messages) == 1 and "out of memory while running model 1" in messages[0]
    assert "CPU" in messages[0]

    calls.clear()

    def runtime_oom(dev):
        calls.append(dev.type)
        if dev.type == "cuda":
            raise RuntimeError("CUDA error: out of memory")
        return 7

    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        assert run_with_oom_fallback(runtime_oom, "cuda") == 7
    assert calls == ["cuda", "cpu"]


def test_other_errors_and_cpu_oom_propagate(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def broken(dev):
        raise RuntimeError("size mismatch")

    with pytest.raises(RuntimeError, match="size mismatch"):
        run_with_oom_fallback(broken, "cuda")

    def cpu_oom(dev):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_oom_fallback(cpu_oom, "cpu")


def test_one_list_of_devices_for_the_cli_and_both_docks():
    from napari_sartorius._widgets import finetune, segment
    from napari_sartorius.cli import build_parser

    assert "mps" in device_mod.DEVICE_CHOICES
    assert segment.DEVICE_CHOICES is device_mod.DEVICE_CHOICES
    assert finetune.DEVICE_CHOICES is device_mod.DEVICE_CHOICES
    parser = build_parser()
    for command in ("segment", "train"):
        sub = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions if a.dest == "device")
        assert tuple(sub.choices) == device_mod.DEVICE_CHOICES
