"""``segment`` sharded over 2 gloo ranks on loopback: a rank killed halfway, then resumed under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import napari_sartorius
from napari_sartorius.classical import ClassicalEngine, ClassicalSettings
from napari_sartorius.inference.folder_run import done_files, segment_folder
from napari_sartorius.io.label_images import read_label_image
from napari_sartorius.synthetic import make_sample

pytest.importorskip("torch.distributed")
SRC = Path(napari_sartorius.__file__).resolve().parents[1]
N_IMAGES = 8
SHAPE = (256, 256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def segment_args(images: Path, out: Path, *more) -> list[str]:
    return ["-m", "napari_sartorius.cli", "segment", str(images), "--out", str(out), "--device", "cpu",
            "--cell-type", "shsy5y", *more]


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.fixture
def images(tmp_path):
    from skimage.io import imsave

    d = tmp_path / "images"
    d.mkdir()
    for k in range(N_IMAGES):
        imsave(d / f"im{k}.png", make_sample("shsy5y", seed=k, shape=SHAPE).image, check_contrast=False)
    return d


def test_a_rank_killed_halfway_then_resumed_loses_no_image_and_repeats_none(images, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, *segment_args(images, out)],
                         env=env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    part1 = out / "parts" / "rank1.jsonl"
    deadline = time.monotonic() + 240
    while complete_lines(part1) < 1 and procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    lines_at_kill = complete_lines(part1)
    assert procs[1].returncode == -signal.SIGKILL and 1 <= lines_at_kill < N_IMAGES // 2, "rank 1 was not killed halfway"
    try:
        _, err0 = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:  # torchrun would stop it; do so too
        procs[0].kill()
        _, err0 = procs[0].communicate()
    assert procs[0].returncode != 0
    if procs[0].returncode > 0:  # it saw the dead rank: one line saying what to do
        last = err0.strip().splitlines()[-1]
        assert "segment: error:" in last and "--resume" in last, err0
    assert not (out / "predictions.json").exists()
    done = done_files(out)
    assert len(done) < N_IMAGES
    for label in out.glob("*_labels.tif"):  # any label image there is complete
        assert read_label_image(label).shape == SHAPE

    # resumed under torchrun itself, on two new ranks
    port = free_port()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), *segment_args(images, out, "--resume")],
        env=env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "already done" in run.stderr and f"for {N_IMAGES} image(s)" in run.stdout
    lines = [json.loads(line)["file"] for p in sorted((out / "parts").glob("rank*.jsonl"))
             for line in p.read_text().splitlines()]
    assert sorted(lines) == sorted(f"im{k}.png" for k in range(N_IMAGES))  # none lost, none twice
    assert not (out / ".segment.lock").exists()
    # the same predictions as one process segmenting the folder in one go
    solo = tmp_path / "solo"
    from napari_sartorius.inference.folder_run import FolderSettings

    segment_folder(sorted(images.glob("*.png")), [ClassicalEngine(ClassicalSettings(cell_type="shsy5y"))], solo,
                   FolderSettings(cell_type="shsy5y"), say=lambda _: None)
    assert json.loads((out / "predictions.json").read_text()) == json.loads((solo / "predictions.json").read_text())
