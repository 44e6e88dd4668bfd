import os

import pytest

from napari_sartorius.io.atomic import atomic_path, atomic_write


def test_atomic_write_text_and_binary(tmp_path):
    p = tmp_path / "out.txt"
    with atomic_write(p) as fh:
        fh.write("hello")
    assert p.read_text() == "hello"
    with atomic_write(p, "wb") as fh:
        fh.write(b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_error_keeps_old_file_and_removes_temp(tmp_path):
    p = tmp_path / "keep.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write("half of the new cont")
            raise RuntimeError("disk on fire")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.json"]


def test_error_before_first_write_leaves_nothing(tmp_path):
    p = tmp_path / "new.csv"
    with pytest.raises(ValueError):
        with atomic_path(p):
            raise ValueError("bad input")
    assert not p.exists()
    assert os.listdir(tmp_path) == []


def test_missing_folder_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_write(tmp_path / "nope" / "x.txt"):
            pass
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x.txt", "a"):
            pass


def test_result_has_ordinary_permissions(tmp_path):
    p = tmp_path / "perm.txt"
    with atomic_write(p) as fh:
        fh.write("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
