"""Folder inference: sharding, streaming parts, resume, merge, failures, lock, disk full (in process)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sartorius.classical import ClassicalEngine, ClassicalSettings
from napari_sartorius.inference import folder_run
from napari_sartorius.inference.folder_run import (
    FolderRunError,
    FolderSettings,
    OutputLock,
    OutputLocked,
    done_files,
    merge_parts,
    segment_folder,
    shard,
)
from napari_sartorius.io.label_images import read_label_image
from napari_sartorius.synthetic import make_sample

SHAPE = (96, 128)


@pytest.fixture
def folder(tmp_path):
    from skimage.io import imsave

    d = tmp_path / "images"
    d.mkdir()
    for k in range(5):
        s = make_sample(("cort", "astro", "shsy5y")[k % 3], seed=k, shape=SHAPE)
        imsave(d / f"im{k}.png", s.image, check_contrast=False)
    return d


def images_of(d: Path) -> list[Path]:
    return sorted(d.glob("*.png"))


def engines():
    return [ClassicalEngine(ClassicalSettings())]


class FakeRank:
    """Rank ``rank`` of ``world`` run one after the other in this process (meetings are no-ops)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def all_ok(self, ok):
        return ok

    def barrier(self):
        return None


def quiet(_line):
    return None


def predictions(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def per_file(preds) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in preds:
        out.setdefault(p["file_name"], []).append(p)
    return out


def test_shard_is_disjoint_and_covering():
    items = list(range(11))
    shares = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == items
    assert shares[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="rank 3 of world size 3"):
        shard(items, 3, 3)


def test_two_ranks_give_the_single_process_result(folder, tmp_path):
    imgs = images_of(folder)
    solo = tmp_path / "solo"
    res = segment_folder(imgs, engines(), solo, say=quiet)
    assert res.processed == 5 and res.merged_images == 5 and res.predictions == solo / "predictions.json"
    sharded = tmp_path / "sharded"
    # rank 0 finishes first: its merge finds rank 1's images missing and writes no predictions.json
    with pytest.raises(FolderRunError, match="2 image.*no results yet.*--resume"):
        segment_folder(imgs, engines(), sharded, group=FakeRank(0, 2), say=quiet)
    assert not (sharded / "predictions.json").exists()
    assert done_files(sharded) == {"im0.png", "im2.png", "im4.png"}
    r1 = segment_folder(imgs, engines(), sharded, group=FakeRank(1, 2), say=quiet)
    assert r1.processed == 2 and r1.predictions is None
    merge_parts(imgs, sharded)
    assert predictions(sharded) == predictions(solo)
    assert [p["image_id"] for p in predictions(solo)] == sorted(p["image_id"] for p in predictions(solo))
    for k in range(5):
        assert np.array_equal(read_label_image(solo / f"im{k}_labels.tif"),
                              read_label_image(sharded / f"im{k}_labels.tif"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_after_a_kill_loses_no_image_and_repeats_none(folder, tmp_path):
    imgs = images_of(folder)
    out = tmp_path / "out"
    segment_folder(imgs, engines(), out, say=quiet)
    reference = predictions(out)
    # the state a SIGKILL while finishing im4 leaves: its label half-written under a temporary name,
    # its line cut short, the lock of the dead process, no final predictions.json
    part = out / "parts" / "rank0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    part.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    (out / "im4_labels.tif").unlink()
    (out / ".im4_labels.tif.abc123.tmp").write_bytes(b"half")
    (out / "predictions.json").unlink()
    (out / ".segment.lock").write_text(json.dumps({"pid": dead_pid(), "host": __import__("socket").gethostname(),
                                                   "started": "then"}))
    said = []
    res = segment_folder(imgs, engines(), out, resume=True, say=said.append)
    assert res.processed == 1 and res.skipped == 4
    assert any("took over the lock" in line for line in said)
    assert predictions(out) == reference
    assert sorted(json.loads(line)["file"] for line in part.read_text().splitlines()) == [p.name for p in imgs]
    assert (out / "im4_labels.tif").is_file() and not list(out.glob(".*.tmp"))
    assert not (out / ".segment.lock").exists()
    # a resumed run that finds everything done only merges
    res = segment_folder(imgs, engines(), out, resume=True, say=quiet)
    assert res.processed == 0 and res.skipped == 5 and predictions(out) == reference


def test_without_resume_a_run_starts_over(folder, tmp_path):
    imgs = images_of(folder)
    out = tmp_path / "out"
    segment_folder(imgs[:2], engines(), out, say=quiet)
    res = segment_folder(imgs, engines(), out, say=quiet)
    assert res.processed == 5 and res.skipped == 0
    assert len(per_file(predictions(out))) == len({p["file_name"] for p in predictions(out)})
    assert len((out / "parts" / "rank0.jsonl").read_text().splitlines()) == 5


def test_an_unreadable_image_in_the_middle_is_listed_and_the_run_goes_on(folder, tmp_path):
    good = images_of(folder)
    (folder / "im2.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    said = []
    res = segment_folder(good, engines(), out, say=said.append)
    assert [name for name, _ in res.failed] == ["im2.png"] and res.failures_total == 1
    assert sum("im2.png: skipped" in line for line in said) == 1
    assert (out / "failures.txt").read_text().startswith("im2.png: ")
    assert not (out / "im2_labels.tif").exists()
    assert "im2.png" not in {p["file_name"] for p in predictions(out)}
    assert {"im3.png", "im4.png"} <= {p["file_name"] for p in predictions(out)}
    # fixed, then resumed: only that image runs, and the failure list goes away
    from skimage.io import imsave

    imsave(folder / "im2.png", make_sample("shsy5y", seed=2, shape=SHAPE).image, check_contrast=False)
    res = segment_folder(good, engines(), out, resume=True, say=quiet)
    assert res.processed == 1 and res.failures_total == 0 and not (out / "failures.txt").exists()
    assert res.merged_images == 5 and done_files(out) == {p.name for p in good}
    assert (out / "im2_labels.tif").is_file()


def test_a_second_run_on_the_same_folder_is_refused(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = OutputLock(out)
    other.acquire()  # this live process holds it
    with pytest.raises(OutputLocked, match="being written by another segment run.*pid"):
        segment_folder(images_of(folder), engines(), out, say=quiet)
    assert not (out / "parts").exists()  # nothing touched
    other.release()
    assert not (out / ".segment.lock").exists()


def test_a_full_disk_stops_with_one_line_and_resume_finishes(folder, tmp_path, monkeypatch):
    imgs = images_of(folder)
    out = tmp_path / "out"
    real = folder_run._write_label_stack
    calls = []

    def full_on_third(labels, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(labels, path)

    monkeypatch.setattr(folder_run, "_write_label_stack", full_on_third)
    with pytest.raises(FolderRunError, match="disk full while writing .*im2_labels.tif.*--resume") as err:
        segment_folder(imgs, engines(), out, say=quiet)
    assert "\n" not in str(err.value)
    assert done_files(out) == {"im0.png", "im1.png"} and not (out / "predictions.json").exists()
    assert not (out / ".segment.lock").exists()
    monkeypatch.setattr(folder_run, "_write_label_stack", real)
    res = segment_folder(imgs, engines(), out, resume=True, say=quiet)
    assert res.processed == 3 and res.merged_images == 5


def test_decoding_in_dataloader_workers_gives_the_same_result(folder, tmp_path):
    imgs = images_of(folder)
    segment_folder(imgs, engines(), tmp_path / "a", say=quiet)
    segment_folder(imgs, engines(), tmp_path / "b", workers=2, say=quiet)
    assert predictions(tmp_path / "a") == predictions(tmp_path / "b")


def test_a_multi_plane_tiff_gives_a_label_stack_and_one_result_per_plane(tmp_path):
    import tifffile

    stack = np.stack([make_sample("shsy5y", seed=s, shape=SHAPE).image for s in (1, 2, 3)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    out = tmp_path / "out"
    res = segment_folder([path], engines(), out, FolderSettings(cell_type="shsy5y"), say=quiet)
    assert res.merged_images == 3
    labels = tifffile.imread(out / "stack_labels.tif")
    assert labels.shape == (3,) + SHAPE
    ids = [set(np.unique(plane)) - {0} for plane in labels]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # unique over the stack
    preds = predictions(out)
    assert {p["file_name"] for p in preds} == {"stack_z0.tif", "stack_z1.tif", "stack_z2.tif"}
    assert {p["image_id"] for p in preds} == {1, 2, 3}
    assert sum(p["file_name"] == "stack_z1.tif" for p in preds) == len(ids[1])


def test_several_images_per_pass_give_the_same_results(tmp_path, fakes):
    from skimage.io import imsave

    d = tmp_path / "blobs"
    d.mkdir()
    for k in range(5):
        imsave(d / f"b{k}.png", fakes.blob_image(seed=k), check_contrast=False)
    imsave(d / "b5.png", fakes.blob_image(shape=(80, 90), seed=5), check_contrast=False)  # another size
    imgs = sorted(d.glob("*.png"))
    one, three = fakes.BlobEngine(), fakes.BlobEngine()
    segment_folder(imgs, [one], tmp_path / "one", say=quiet)
    said = []
    segment_folder(imgs, [three], tmp_path / "three", FolderSettings(batch=3), say=said.append)
    assert one.batch_sizes == [1] * 6 and three.batch_sizes == [3, 2, 1]
    assert predictions(tmp_path / "one") == predictions(tmp_path / "three") != []
    assert sum("(3 images per pass)" in line for line in said) == 3
    for k in range(6):
        assert np.array_equal(read_label_image(tmp_path / "one" / f"b{k}_labels.tif"),
                              read_label_image(tmp_path / "three" / f"b{k}_labels.tif"))
    # with TTA or an ensemble, images go one at a time (their variants form the batch)
    flips = fakes.BlobEngine()
    segment_folder(imgs[:2], [flips], tmp_path / "flips", FolderSettings(batch=3, tta="flips"), say=quiet)
    assert flips.batch_sizes == [4, 4]


def test_the_cells_a_file_reports_are_the_records_it_writes(tmp_path, fakes):
    """A raw detection whose mask is empty at 0.5 has no COCO record: the per-file line counts records."""
    from skimage.io import imsave

    from napari_sartorius.instances import Instances

    class FaintFirst(fakes.BlobEngine):
        def predict_one(self, image):
            inst = super().predict_one(image)
            masks = [m * (0.4 if k == 0 else 1.0) for k, m in enumerate(inst.masks)]  # first mask < 0.5
            return Instances(image_size=inst.image_size, boxes=inst.boxes, scores=inst.scores,
                             classes=inst.classes, masks=masks, mask_origins=inst.mask_origins)

    d = tmp_path / "blobs"
    d.mkdir()
    imsave(d / "b0.png", fakes.blob_image(seed=0), check_contrast=False)
    said = []
    result = segment_folder(sorted(d.glob("*.png")), [FaintFirst()], tmp_path / "out", FolderSettings(raw=True),
                            say=said.append)
    n = len(predictions(tmp_path / "out"))
    assert n == len(FaintFirst().predict_one(fakes.blob_image(seed=0))) - 1 > 0
    assert any(f"b0.png: {n} cells" in line for line in said), said
    assert result.merged_cells == n
