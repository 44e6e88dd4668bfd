"""Downloading, verifying and caching pretrained weights, end to end against a loopback HTTP server
(127.0.0.1) that serves small checkpoints written here; no test reaches the internet."""

from __future__ import annotations

import errno
import hashlib
import socket
import textwrap
import threading
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from napari_sartorius.models import download, zoo
from napari_sartorius.models.checkpoint import load_checkpoint, read_checkpoint
from napari_sartorius.models.download import PretrainedError, fetch_pretrained
from napari_sartorius.models.zoo import PretrainedEntry

from test_detectron2_import import export_to_d2  # the project -> detectron2 name mapping of the import tests


# -- a loopback server ------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        route = self.server.routes.get(self.path)
        self.server.hits.append(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, ctype, send = route
        if self.path.startswith("/gate/"):  # held until the test opens the gate
            self.server.gate.wait(30)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:send])  # fewer bytes than announced: a broken-off transfer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.hits, httpd.gate = {}, [], threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def serve(path, body, ctype="application/octet-stream", send=None):
        httpd.routes[path] = (body, ctype, len(body) if send is None else send)
        return httpd.base + path

    httpd.serve = serve
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.pth"  # nothing listens there any more


# -- a small real detectron2 checkpoint --------------------------------------------------------------
CONFIG = """
_BASE_: "../Base-RCNN-FPN.yaml"
MODEL:
  MASK_ON: True
  RESNETS: {DEPTH: 50}
  ROI_HEADS: {NUM_CLASSES: 1}
  ROI_BOX_HEAD: {FC_DIM: 32}
  RPN: {PRE_NMS_TOPK_TEST: 200, POST_NMS_TOPK_TEST: 50}
INPUT: {MIN_SIZE_TEST: 0}
TEST: {DETECTIONS_PER_IMAGE: 20}
"""
C4_CONFIG = """
_BASE_: "../Base-RCNN-C4.yaml"
MODEL: {MASK_ON: True, RESNETS: {DEPTH: 50}, ROI_HEADS: {NUM_CLASSES: 1}}
"""


@pytest.fixture(scope="module")
def d2_file(tmp_path_factory):
    """``(bytes of a detectron2 .pth of a random 1-class R-50-FPN, its config path, the project model)``."""
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.d2_config import config_to_model_config, load_d2_config

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("d2")
    cfg_path = folder / "output" / "config.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(textwrap.dedent(CONFIG))
    (folder / "output" / "c4.yaml").write_text(textwrap.dedent(C4_CONFIG))
    config = config_to_model_config(load_d2_config(cfg_path), ("cell",))
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = folder / "model_final.pth"
    torch.save({"model": export_to_d2(model, config), "iteration": 10}, path)
    return path.read_bytes(), str(cfg_path), model


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache folder for each test."""
    monkeypatch.setenv(download.ENV_HOME, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(url, config, *, name="test-r50", sha256=None, size=None, arch="mask_rcnn_R_50_FPN") -> PretrainedEntry:
    return PretrainedEntry(
        name=name, kind="detectron2", url=url, filename=url.rsplit("/", 1)[1], arch=arch, classes=("cell",),
        config=config, size_bytes=size, approx_mb=None, sha256=sha256, sha256_prefix=None,
        description="test entry", provenance="written by the tests",
    )


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _image():
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.uniform(0, 255, size=(3, 64, 96)).astype(np.float32))


# -- the download path end to end -------------------------------------------------------------------
def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(download.ENV_HOME, raising=False)
    monkeypatch.setattr(download.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "xdg" / "napari-sartorius"
    monkeypatch.setattr(download.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert download.cache_dir() == tmp_path / "local" / "napari-sartorius"
    monkeypatch.setenv(download.ENV_HOME, str(tmp_path / "mine"))
    assert download.cache_dir() == tmp_path / "mine"
    e = zoo.get_entry("livecell-shsy5y")
    assert download.download_path(e) == tmp_path / "mine" / "downloads" / "LIVECell_anchor_based_shsy5y_model.pth"
    assert download.checkpoint_path(e) == tmp_path / "mine" / "checkpoints" / "livecell-shsy5y.pt"


def test_download_verify_import_and_second_use_is_cached(server, d2_file, home):
    body, cfg, model = d2_file
    entry = _entry(server.serve("/e2e/model_final.pth", body), cfg, sha256=hashlib.sha256(body).hexdigest(),
                   size=len(body))
    seen = []
    path = fetch_pretrained(entry, progress=lambda done, total: seen.append((done, total)))
    assert path == download.checkpoint_path(entry)
    assert seen[-1] == (len(body), len(body)) and len(seen) > 1
    assert (home / "downloads" / "model_final.pth").read_bytes() == body
    assert _files(home) == ["checkpoints/test-r50.pt", "checkpoints/test-r50.pt.source", "downloads/model_final.pth"]
    _, config, extra = read_checkpoint(path)
    digest = hashlib.sha256(body).hexdigest()
    assert config.provenance["sha256"] == digest == extra["pretrained"]["sha256"]
    assert config.provenance["url"] == entry.url and config.provenance["pretrained"] == "test-r50"
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        a, b = model([_image()])[0], loaded([_image()])[0]
    for key in ("boxes", "scores", "masks"):
        assert torch.equal(a[key], b[key])
    assert download.cached_status(entry) == "ready"
    # second use: no request, no import
    hits = len(server.hits)
    assert fetch_pretrained(entry) == path
    assert len(server.hits) == hits


def test_out_copies_the_checkpoint(server, d2_file, home, tmp_path):
    body, cfg, _ = d2_file
    entry = _entry(server.serve("/out/model_final.pth", body), cfg)
    out = tmp_path / "mine" / "livecell.pt"
    assert fetch_pretrained(entry, out=out) == out
    assert out.read_bytes() == download.checkpoint_path(entry).read_bytes()


def test_hand_copied_file_is_used_offline(d2_file, home):
    body, cfg, _ = d2_file
    entry = _entry(_closed_port_url(), cfg)
    with pytest.raises(PretrainedError) as info:
        fetch_pretrained(entry)
    where = download.download_path(entry)
    msg = str(info.value)
    assert "\n" not in msg and entry.url in msg and str(where) in msg
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(body)
    path = fetch_pretrained(entry)
    assert read_checkpoint(path)[1].provenance["sha256"] == hashlib.sha256(body).hexdigest()


# -- bad input: each a one-line error, nothing partial in the cache, the previous file untouched -----
def _full_disk(fh, data):
    raise OSError(errno.ENOSPC, "No space left on device")


BAD = {
    "http 404": (lambda s, b: s.base + "/missing/model.pth", None, r"HTTP 404"),
    "html page": (lambda s, b: s.serve("/html/model.pth", b"<!DOCTYPE html><html><body>Access denied</body></html>",
                                       "text/html"), None, "web page instead of the weights"),
    "html as octet-stream": (lambda s, b: s.serve("/html2/model.pth", b"\n <html><head>moved</head></html>"),
                             None, "web page instead of the weights"),
    "truncated": (lambda s, b: s.serve("/trunc/model.pth", b, send=len(b) // 3), None, r"truncated \(\d+ of \d+ bytes\)"),
    "no network": (lambda s, b: _closed_port_url(), None, "cannot reach .*copy it to"),
    "full disk": (lambda s, b: s.serve("/full/model.pth", b), _full_disk, "disk is full"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_downloads_leave_nothing_and_keep_the_previous_file(case, server, home, monkeypatch):
    body = bytes(range(256)) * 8192  # 2 MB: several chunks
    make_url, write, pattern = BAD[case]
    url = make_url(server, body)
    if write is not None:
        monkeypatch.setattr(download, "_write_chunk", write)
    dest = home / "downloads" / "model.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"previous good file")
    with pytest.raises(PretrainedError, match=pattern) as info:
        download.download_file(url, dest)
    assert "\n" not in str(info.value)
    assert _files(home) == ["downloads/model.pth"] and dest.read_bytes() == b"previous good file"


@pytest.mark.parametrize("case", ["http 404", "html page", "truncated", "no network", "full disk"])
def test_bad_fetch_leaves_an_empty_cache(case, server, home, monkeypatch):
    make_url, write, pattern = BAD[case]
    url = make_url(server, bytes(300_000))
    if write is not None:
        monkeypatch.setattr(download, "_write_chunk", write)
    with pytest.raises(PretrainedError, match=pattern):
        fetch_pretrained(_entry(url, "unused.yaml", name=f"bad-{case.replace(' ', '-')}"))
    assert _files(home) == []


def test_not_enough_free_space_is_refused_before_downloading(server, home, monkeypatch):
    url = server.serve("/space/model.pth", bytes(1 << 20))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(PretrainedError, match="not enough free disk space.*NAPARI_SARTORIUS_HOME"):
        download.download_file(url, home / "downloads" / "model.pth")
    assert _files(home) == []


def test_sha256_and_size_mismatch(server, home):
    url = server.serve("/hash/model.pth", b"x" * 5000)
    with pytest.raises(PretrainedError, match="SHA-256"):
        download.download_file(url, home / "a.pth", sha256="0" * 64)
    with pytest.raises(PretrainedError, match="has 5000 bytes, the registry says 4000"):
        download.download_file(url, home / "a.pth", size_bytes=4000)
    with pytest.raises(PretrainedError, match="its name says it starts with"):
        download.download_file(url, home / "a.pth", sha256_prefix="00000000")
    tmp, digest = download.download_file(url, home / "a.pth", sha256_prefix=hashlib.sha256(b"x" * 5000).hexdigest()[:8])
    assert tmp.read_bytes() == b"x" * 5000 and tmp.parent == home and digest == hashlib.sha256(b"x" * 5000).hexdigest()


def test_cancel_keeps_nothing(server, home):
    url = server.serve("/cancel/model.pth", bytes(3 * download.CHUNK))
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # stop after the first chunk

    with pytest.raises(download.DownloadCancelled, match="cancelled"):
        download.download_file(url, home / "downloads" / "model.pth", stop=stop)
    assert _files(home) == []


def test_checkpoint_of_another_architecture_under_a_registry_name(server, d2_file, home):
    body, cfg, _ = d2_file
    c4_cfg = cfg.replace("config.yaml", "c4.yaml")
    entry = _entry(server.serve("/arch/model_final.pth", body), c4_cfg, arch="mask_rcnn_R_50_C4", name="test-c4")
    with pytest.raises(PretrainedError, match="not a mask_rcnn_R_50_C4 checkpoint with 1 class") as info:
        fetch_pretrained(entry)
    assert "\n" not in str(info.value)
    assert _files(home) == []


def test_a_bad_hand_copied_file_is_named(d2_file, home):
    _, cfg, _ = d2_file
    entry = _entry(_closed_port_url(), cfg)
    where = download.download_path(entry)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(b"<html><body>404</body></html>")
    with pytest.raises(PretrainedError, match="is a web page, not the weights: delete it"):
        fetch_pretrained(entry)
    assert _files(home) == [f"downloads/{entry.filename}"]


# -- the command line (napari_sartorius.commands.pretrained) -----------------------------------------
def _cli(argv, capsys):
    from napari_sartorius.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_pretrained_list_shows_every_entry(capsys, home):
    import json

    code, out, _ = _cli(["pretrained", "list"], capsys)
    assert code == 0
    for name in zoo.REGISTRY:
        assert f"\n{name} " in out
    assert str(home) in out
    code, out, _ = _cli(["pretrained", "list", "--json"], capsys)
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(zoo.REGISTRY) and all(r["cached"] == "-" for r in rows)


def test_cli_get_segment_and_train_base_by_name(server, d2_file, home, tmp_path, capsys, monkeypatch):
    from skimage.io import imsave

    from napari_sartorius.commands.pretrained import resolve_model_arg

    body, cfg, _ = d2_file
    entry = _entry(server.serve("/cli/model_final.pth", body), cfg, name="test-cli")
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    out = tmp_path / "here" / "model.pt"
    code, stdout, err = _cli(["pretrained", "get", "test-cli", "--out", str(out)], capsys)
    assert code == 0, err
    assert out.is_file() and "ready at" in stdout and "downloading" in err
    # --model NAME: resolved to the cached checkpoint, no second download
    hits = len(server.hits)
    image = tmp_path / "img.png"
    imsave(image, (np.random.default_rng(0).uniform(0, 255, (64, 96))).astype(np.uint8), check_contrast=False)
    code, _, err = _cli(["segment", str(image), "--model", "test-cli", "--out", str(tmp_path / "seg")], capsys)
    assert code == 0, err
    assert (tmp_path / "seg" / "predictions.json").is_file() and len(server.hits) == hits
    assert resolve_model_arg("test-cli") == str(download.checkpoint_path(entry))
    assert resolve_model_arg(str(out)) == str(out) and resolve_model_arg("classical") == "classical"
    assert resolve_model_arg(None) is None
    with pytest.raises(ValueError, match="ImageNet body weights"):
        resolve_model_arg("imagenet-r50")


def test_cli_errors_are_one_line(home, capsys, monkeypatch):
    code, _, err = _cli(["pretrained", "get", "livecell-nope"], capsys)
    assert code == 2 and err.count("\n") == 1 and "livecell-shsy5y" in err
    entry = _entry(_closed_port_url(), "unused.yaml", name="test-offline")
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    code, _, err = _cli(["pretrained", "get", "test-offline"], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(lines) == 1
    assert entry.url in lines[0] and str(download.download_path(entry)) in lines[0]


# -- ImageNet body weights (init-model --imagenet NAME) -----------------------------------------------
def _imagenet_entry(url, name="test-imagenet") -> PretrainedEntry:
    return PretrainedEntry(
        name=name, kind="imagenet", url=url, filename=url.rsplit("/", 1)[1], arch="mask_rcnn_R_50_FPN", classes=(),
        config=None, size_bytes=None, approx_mb=None, sha256=None, sha256_prefix=None,
        description="test entry", provenance="written by the tests",
    )


def _state_bytes(state, tmp_path, name):
    path = tmp_path / name
    torch.save(state, path)
    return path.read_bytes()


def test_imagenet_weights_are_verified_against_the_body(server, home, tmp_path, capsys, monkeypatch):
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(0)
    good = _state_bytes(resnet50(weights=None).state_dict(), tmp_path, "r50.pth")
    entry = _imagenet_entry(server.serve("/in/resnet50-test.pth", good))
    assert fetch_pretrained(entry) == download.download_path(entry)
    assert download.download_path(entry).read_bytes() == good and download.cached_status(entry) == "ready"
    # init-model --imagenet NAME uses the cached file
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    code, _, err = _cli(["init-model", "mask_rcnn_R_50_FPN", "--imagenet", entry.name, "--out",
                         str(tmp_path / "init.pt")], capsys)
    assert code == 0, err
    _, config, _ = read_checkpoint(tmp_path / "init.pt")
    assert config.provenance["imagenet_weights"] == "resnet50-test.pth"
    # another depth under an ImageNet name: refused, nothing kept
    wrong = _imagenet_entry(server.serve("/in/resnet18-test.pth", _state_bytes(resnet18().state_dict(), tmp_path,
                                                                               "r18.pth")), name="test-wrong")
    with pytest.raises(PretrainedError, match="not mask_rcnn_R_50_FPN's ImageNet body"):
        fetch_pretrained(wrong)
    assert not download.download_path(wrong).exists()


def test_full_disk_while_writing_the_checkpoint_keeps_nothing(server, d2_file, home, monkeypatch):
    from napari_sartorius.models import checkpoint

    body, cfg, _ = d2_file
    entry = _entry(server.serve("/fullckpt/model_final.pth", body), cfg, name="test-full")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", no_space)
    with pytest.raises(PretrainedError, match="cannot write .*test-full.pt .*No space left.*free some space"):
        fetch_pretrained(entry)
    assert _files(home) == []


def test_livecell_entry_end_to_end(server, home, tmp_path, monkeypatch):
    """The registry's livecell-shsy5y entry with its bundled config, served from loopback: a random
    LIVECell-architecture checkpoint (ResNeSt-200 cut to a few blocks) in detectron2's names."""
    import dataclasses

    from napari_sartorius.models import resnest
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.class_surgery import inherit_single_class
    from napari_sartorius.models.d2_config import config_to_model_config, load_d2_config

    monkeypatch.setitem(resnest.RESNEST_BLOCKS, 200, (1, 2, 1, 1))
    torch.set_num_threads(1)
    real = zoo.get_entry("livecell-shsy5y")
    config = config_to_model_config(load_d2_config(real.config), real.classes)
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = tmp_path / real.filename
    torch.save({"model": export_to_d2(model, config), "iteration": 30000}, path)
    body = path.read_bytes()
    entry = dataclasses.replace(real, url=server.serve("/livecell/" + real.filename, body))
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)

    ckpt = fetch_pretrained("livecell-shsy5y")
    assert ckpt == home / "checkpoints" / "livecell-shsy5y.pt"
    loaded, loaded_config = load_checkpoint(ckpt)
    assert loaded_config.arch == "cascade_mask_rcnn_ResNeSt_200_FPN" and loaded_config.class_names == ("cell",)
    assert loaded_config.provenance["sha256"] == hashlib.sha256(body).hexdigest()
    for name, value in model.state_dict().items():
        if "mask_fcn_logits" in name:  # detectron2 has no background mask channel: imported as zeros
            assert torch.equal(loaded.state_dict()[name][1:], value[1:]), name
            continue
        assert torch.equal(loaded.state_dict()[name], value), name
    _, cfg3, _ = inherit_single_class(loaded, loaded_config, ("shsy5y", "astro", "cort"))
    assert loaded.roi_heads.box_predictor[2].cls_score.weight.shape[0] == 4 and cfg3.num_classes == 3


def test_model_zoo_pkl_and_a_pickle_with_code(server, d2_file, home, tmp_path):
    import pickle

    from napari_sartorius.models.detectron2_import import load_detectron2_state

    body, cfg, _ = d2_file
    state = load_detectron2_state(_write(tmp_path / "src.pth", body))
    pkl = pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"})
    entry = _entry(server.serve("/pkl/model_final_abc123.pkl", pkl), cfg, name="test-pkl")
    assert read_checkpoint(fetch_pretrained(entry))[1].provenance["sha256"] == hashlib.sha256(pkl).hexdigest()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = pickle.dumps({"model": {"x": Evil()}})
    bad = _entry(server.serve("/pkl/model_final_evil.pkl", evil), cfg, name="test-evil")
    with pytest.raises(PretrainedError, match="refused to unpickle.*builtins.print") as info:
        fetch_pretrained(bad)
    assert "\n" not in str(info.value)
    assert not download.download_path(bad).exists() and not download.checkpoint_path(bad).exists()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
