"""Import torch safely inside napari: call :func:`guard_torch_import` before a widget's first torch import.

Why: the widgets import torch lazily, after napari has created its OpenGL context. Where that context
comes from Mesa (Xvfb, llvmpipe, and the radeonsi/llvmpipe drivers of many Linux desktops), Mesa has
loaded ``libLLVM-*.so`` into the process with its symbols exported. torch/torchvision import ``triton``
when it is installed (CUDA wheels bring it), and ``libtriton.so`` embeds its own LLVM: its static
initialisers then bind to Mesa's LLVM symbols and the process dies with a segmentation fault
(reproduced here: Xvfb + napari viewer, then ``import torchvision.ops`` -> SIGSEGV in triton's
``create_module``; the reverse order, triton first, is fine).

The guard only acts when an LLVM shared library is already mapped into the process and triton is not
yet imported: it then marks ``triton`` as unavailable (``sys.modules["triton"] = None``), which torch
treats as "triton not installed" (as on CPU-only installs). Only ``torch.compile``'s GPU code
generation needs triton; nothing in this project uses it. Elsewhere (no Mesa LLVM loaded, macOS,
Windows) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["guard_torch_import", "llvm_loaded"]


def llvm_loaded() -> bool:
    """True when a ``libLLVM`` shared library is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return any("libLLVM" in line for line in fh)
    except OSError:
        return False


def guard_torch_import() -> bool:
    """Keep a later ``import torch``/``torchvision`` from loading triton next to Mesa's LLVM.

    Returns True when triton was blocked. Safe to call many times, from any thread.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        present = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        present = False
    if not present or not llvm_loaded():
        return False
    sys.modules["triton"] = None  # makes `import triton` raise ImportError
    return True
