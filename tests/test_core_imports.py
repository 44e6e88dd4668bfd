"""The core must run in a script, a notebook or a cluster job: no napari, Qt or magicgui."""

import pkgutil
import subprocess
import sys

import napari_sartorius

GUI_MODULES = ("_widgets", "_reader", "_writer", "_sample_data")


def core_modules():
    names = []
    for info in pkgutil.walk_packages(napari_sartorius.__path__, "napari_sartorius."):
        parts = info.name.split(".")
        if any(p in GUI_MODULES for p in parts):
            continue
        names.append(info.name)
    return names


def test_core_modules_import_without_gui_packages():
    modules = core_modules()
    assert "napari_sartorius.instances" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'vispy'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"core modules pulled in GUI packages: {out.stdout.strip()}"


def test_package_init_holds_only_the_version():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, napari_sartorius; print(napari_sartorius.__version__, 'torch' in sys.modules, 'numpy' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    version, torch_loaded, numpy_loaded = out.stdout.split()
    assert version == napari_sartorius.__version__
    assert torch_loaded == "False" and numpy_loaded == "False"
