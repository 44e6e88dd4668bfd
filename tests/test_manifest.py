"""The npe2 manifest: valid, found through the entry point, every command importable, and napari's start
(reading the manifest, importing the widget modules) does not import torch."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

import napari_sartorius

MANIFEST = Path(napari_sartorius.__file__).with_name("napari.yaml")


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(MANIFEST)


def test_manifest_validates(manifest):
    assert manifest.name == "napari-sartorius"
    # Round-trip through npe2's schema validation.
    npe2.PluginManifest.model_validate(manifest.model_dump())


def test_repository_root_manifest_is_the_packaged_one():
    root = Path(__file__).resolve().parents[1] / "napari.yaml"
    assert root.exists()
    assert root.resolve() == MANIFEST.resolve()


def test_manifest_found_through_the_entry_point():
    found = npe2.PluginManifest.from_distribution("napari-sartorius")
    assert found.name == "napari-sartorius"
    assert {c.id for c in found.contributions.commands} >= {"napari-sartorius.segment_cells"}


def test_every_command_imports(manifest):
    for cmd in manifest.contributions.commands:
        assert cmd.python_name, f"{cmd.id} has no python_name"
        module, _, attr = cmd.python_name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), cmd.python_name


def test_contributions(manifest):
    c = manifest.contributions
    assert "Segment cells" in [w.display_name for w in c.widgets]
    assert {s.key for s in c.sample_data} == {"shsy5y", "astro", "cort"}
    patterns = {p for r in c.readers for p in r.filename_patterns}
    assert {"*.json", "*.csv"} <= patterns
    assert any(".json" in w.filename_extensions and "labels" in w.layer_types for w in c.writers)
    ids = {cmd.id for cmd in c.commands}
    for menu, items in (c.menus or {}).items():
        for item in items:
            assert item.command in ids, f"menu {menu} names unknown command {item.command}"


def test_widget_modules_do_not_import_torch(manifest):
    """What napari imports to show the plugin's menus and docks must leave torch unloaded."""
    modules = sorted({cmd.python_name.partition(":")[0] for cmd in manifest.contributions.commands})
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(','.join(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {modules} pulled in {out.stdout.strip()[:200]}"
