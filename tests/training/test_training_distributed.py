"""torchrun support: no-op without it, batch sharding by rank, and a real 2-process Gloo run (slow)."""

import os
import socket

import pytest
import torch

from napari_sartorius.training import distributed as dist_utils
from napari_sartorius.training.trainer import _Plan


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_utils.init_from_env("cpu") is None
    assert dist_utils.is_main_process()
    monkeypatch.delenv("WORLD_SIZE")
    assert dist_utils.world_size_from_env() == 1 and dist_utils.init_from_env() is None
    model = torch.nn.Linear(2, 2)
    assert dist_utils.unwrap(model) is model
    with dist_utils.no_sync(model):
        pass
    assert dist_utils.any_rank(True, None) and not dist_utils.any_rank(False, None)


def test_without_torchrun_variables_the_error_says_so(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="launch multi-process training with torchrun"):
        dist_utils.init_from_env("cpu")


def test_ranks_share_each_batch_without_overlap():
    single = _Plan(n=7, seed=3, batch=4, accum=2, world=1, rank=0)
    ranks = [_Plan(n=7, seed=3, batch=2, accum=2, world=2, rank=r) for r in range(2)]
    for it in range(5):
        for micro in range(2):
            together = ranks[0].keys(it, micro) + ranks[1].keys(it, micro)
            assert together == single.keys(it, micro)
    # every image comes once per pass over the data
    seen = [single.keys(0, 0), single.keys(0, 1)]
    first_pass = [k[0] for keys in seen for k in keys][:7]
    assert sorted(first_pass) == list(range(7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import NO_AUG, tiny_config, tiny_dataset
    from napari_sartorius.training.trainer import TrainSettings, run_training, train

    s = TrainSettings(iters=2, lr=0.005, batch_size=1, warmup_iters=0, augment=NO_AUG, checkpoint_period=0,
                      device="cpu", out=os.path.join(out_dir, "ddp.pt"))
    res = run_training(train(tiny_config(), tiny_dataset(2), s))
    torch.save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_utils.cleanup()


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_step(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # DDP keeps the replicas equal
    assert (tmp_path / "ddp.pt").is_file()  # written by rank 0 only (one file, no clash)
