"""Where the networks run: device choice, fp16 autocast on CUDA, and a CPU fallback on GPU out-of-memory.

torch is imported inside the functions, so importing this module (and :mod:`napari_sartorius.inference`)
stays cheap for callers that only use the weight-free engine.
"""

from __future__ import annotations

import contextlib
from typing import Callable, TypeVar

__all__ = [
    "DEVICE_CHOICES",
    "resolve_device",
    "autocast_context",
    "is_out_of_memory",
    "empty_cache",
    "run_with_oom_fallback",
    "OOM_MESSAGE",
]

T = TypeVar("T")

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

OOM_MESSAGE = (
    "The GPU ({device}) ran out of memory{what}; continuing on the CPU, which is much slower. "
    "To stay on the GPU, close other programs using it, use fewer TTA variants, or process large "
    "images in smaller tiles."
)


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device="auto"):
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), ``"mps"`` or a ``torch.device`` into a
    ``torch.device``.

    ``"auto"`` picks CUDA if available, then Apple's MPS, then the CPU. Asking for a device that is
    not available raises ValueError saying what is available, instead of failing later inside a model.
    """
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available (no NVIDIA GPU, driver, or a "
                f"CUDA build of torch {torch.__version__}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} was requested but only {count} CUDA device(s) exist")
        return dev
    if dev.type == "mps":
        if not _mps_available(torch):
            raise ValueError(f"device {device!r} was requested but Apple MPS is not available; use cpu or auto")
        return dev
    raise ValueError(f"unsupported device {device!r}: use one of {', '.join(DEVICE_CHOICES)}")


def autocast_context(device, enabled: bool = True):
    """fp16 autocast on CUDA (``torch.autocast("cuda", dtype=torch.float16)``); a no-op elsewhere.

    MPS and CPU run in fp32: fp16 autocast is not a speed-up worth its risk there.
    """
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if enabled and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and RuntimeErrors that report running out of memory."""
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache() -> None:
    """Release cached GPU memory (CUDA and MPS) so that it can be reused or seen free."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and _mps_available(torch) and hasattr(mps, "empty_cache"):
        mps.empty_cache()


def run_with_oom_fallback(
    fn: Callable[..., T],
    device,
    on_fallback: Callable[[str], None] | None = None,
    what: str = "",
) -> T:
    """Call ``fn(device)``; if it runs out of GPU memory, free the cache, tell the user and call
    ``fn(torch.device("cpu"))`` instead.

    Args:
        fn: the work, taking the device to run on (it must move its model/tensors there itself).
        device: where to try first (anything :func:`resolve_device` accepts).
        on_fallback: called with a message for the user when falling back (default: a
            ``RuntimeWarning`` via :mod:`warnings`).
        what: what was running, for the message (e.g. ``"while running model 2"``).

    Returns:
        ``fn``'s result. Errors other than out-of-memory, and out-of-memory on the CPU, propagate.
    """
    import torch

    dev = resolve_device(device)
    try:
        return fn(dev)
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if dev.type == "cpu" or not is_out_of_memory(exc):
            raise
    # outside the except block, so the failed attempt's frames (and their GPU tensors) are released
    empty_cache()
    message = OOM_MESSAGE.format(device=str(dev), what=f" {what}" if what else "")
    if on_fallback is None:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=2)
    else:
        on_fallback(message)
    return fn(torch.device("cpu"))
