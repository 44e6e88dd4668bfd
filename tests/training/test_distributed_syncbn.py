"""Under torchrun on GPUs, BatchNorm layers (the ResNeSt architectures) become SyncBatchNorm, as
detectron2's SyncBN; on CPU (gloo) they stay BatchNorm, which PyTorch's SyncBatchNorm cannot run on."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_sartorius.training.distributed import DistContext, sync_batchnorm, unwrap, wrap_model


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4))


def test_batchnorm_becomes_syncbatchnorm_for_gpus():
    model = _model()
    weight = model[1].weight
    synced = sync_batchnorm(model, torch.device("cuda", 0))  # conversion only: nothing runs on the GPU
    assert isinstance(synced[1], nn.SyncBatchNorm) and synced[1].weight is weight  # same parameters
    assert isinstance(synced[3], FrozenBatchNorm2d)  # frozen stays frozen
    assert set(synced.state_dict()) == set(_model().state_dict())
    assert sync_batchnorm(_model(), torch.device("cpu"))[1].__class__ is nn.BatchNorm2d


def test_cpu_processes_keep_batchnorm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = unwrap(wrap_model(_model(), DistContext(1, 0, 0, "gloo", torch.device("cpu"))))
        assert inner[1].__class__ is nn.BatchNorm2d
        inner(torch.rand(2, 3, 8, 8))
    finally:
        dist.destroy_process_group()
