"""One registry of architectures: every list of architectures is the registry's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_sartorius.models import config, d2_config, registry


def test_every_list_of_architectures_is_the_registry():
    from napari_sartorius.models.architectures import ARCHITECTURES

    assert config.ARCH_NAMES is registry.ARCH_NAMES
    assert d2_config.ARCHITECTURES is registry.ARCH_NAMES
    assert tuple(ARCHITECTURES) == registry.ARCH_NAMES
    assert config.C4_ARCHS == tuple(n for n, a in registry.REGISTRY.items() if a.kind == "C4")
    for name, info in registry.REGISTRY.items():
        assert ARCHITECTURES[name].kind == info.kind and ARCHITECTURES[name].body == info.body
        assert info.kind in ("C4", "FPN", "cascade") and info.body_norm in ("FrozenBN", "BN")
        assert config.ModelConfig(name).is_cascade == info.is_cascade
    assert registry.REGISTRY["cascade_mask_rcnn_ResNeSt_200_FPN"].body == "ResNeSt_200"


def test_unknown_architecture_lists_them_all():
    with pytest.raises(ValueError) as err:
        registry.check_arch("mask_rcnn_R_18_FPN")
    assert all(name in str(err.value) for name in registry.ARCH_NAMES)


def test_registry_imports_without_torch():
    code = "import sys, napari_sartorius.models.registry as r; print(len(r.ARCH_NAMES), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(registry.ARCH_NAMES)), "False"]


@pytest.mark.parametrize("name", registry.ARCH_NAMES)
def test_stored_parameter_counts_are_the_built_models(name):
    from napari_sartorius.models.architectures import count_parameters

    assert registry.REGISTRY[name].parameters == count_parameters(name)
