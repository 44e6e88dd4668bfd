"""check_checkpoint_file: a cheap, torch-free look at a file before anyone tries to load it."""

import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from napari_sartorius.models.checkpoint_file import CheckpointError, check_checkpoint_file


def test_files_torch_save_wrote_pass(tmp_path):
    new = tmp_path / "new.pt"
    torch.save({"w": torch.zeros(2)}, new)
    assert check_checkpoint_file(new) == "zip"
    old = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2)}, old, _use_new_zipfile_serialization=False)
    assert check_checkpoint_file(old) == "legacy"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("a note about my model\nsecond line\n"), r"is a text file starting 'a note about my model'"),
        (lambda p: p.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=2)), r"is a plain Python pickle.*import-detectron2"),
        (lambda p: p.write_bytes(b""), r"is empty; copy or save it again"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), r"was not written by torch.save"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 40), r"is a truncated or damaged zip"),
    ],
)
def test_other_files_are_refused_with_what_they_are(tmp_path, make, message):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError, match=r"^not a checkpoint: .*model\.pt " + message):
        check_checkpoint_file(path)


def test_a_zip_torch_did_not_write_and_a_folder_are_refused(tmp_path):
    z = tmp_path / "weights.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="zip archive that torch.save did not write"):
        check_checkpoint_file(z)
    with pytest.raises(CheckpointError, match="is a folder"):
        check_checkpoint_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        check_checkpoint_file(tmp_path / "missing.pt")


def test_a_cut_checkpoint_is_refused_before_torch_load(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged zip"):
        check_checkpoint_file(tmp_path / "cut.pt")


def test_the_checker_imports_no_torch():
    code = "import sys; import napari_sartorius.models.checkpoint_file; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
