"""First and second use of a pretrained model through the cache, on a loopback server (no internet).

Builds a random one-class R-50-FPN, saves it as a detectron2 ``.pth`` (detectron2's names, via the
import tests' exporter), serves it from 127.0.0.1 and times :func:`fetch_pretrained`:

* first use: download (streamed, SHA-256 on the way) + ``weights_only`` load + complete import +
  writing the project checkpoint;
* second use: the cached checkpoint is returned (what ``--model NAME`` costs from then on).

    python benchmarks/bench_pretrained.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))

CONFIG = """
_BASE_: "../Base-RCNN-FPN.yaml"
MODEL: {MASK_ON: True, RESNETS: {DEPTH: 50}, ROI_HEADS: {NUM_CLASSES: 1}}
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_detectron2_import import export_to_d2

    from napari_sartorius.models import download
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.d2_config import config_to_model_config, load_d2_config
    from napari_sartorius.models.zoo import PretrainedEntry

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "serve").mkdir()
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(textwrap.dedent(CONFIG))
        config = config_to_model_config(load_d2_config(cfg_path), ("cell",))
        model = build_model(config)
        weights = tmp / "serve" / "model_final.pth"
        torch.save({"model": export_to_d2(model, config)}, weights)
        size = weights.stat().st_size
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(tmp / "serve")))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/model_final.pth"
        entry = PretrainedEntry("bench-r50", "detectron2", url, "model_final.pth", config.arch, ("cell",), str(cfg_path),
                                None, None, None, None, "benchmark", "benchmark")
        first, second = [], []
        for k in range(args.repeat):
            os.environ[download.ENV_HOME] = str(tmp / f"cache{k}")
            t0 = time.perf_counter()
            download.fetch_pretrained(entry)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            download.fetch_pretrained(entry)
            second.append(time.perf_counter() - t0)
        httpd.shutdown()
    print(f"R-50-FPN detectron2 .pth, {size / 1e6:.0f} MB, loopback, 1 thread, median of {args.repeat}:")
    print(f"  first use (download + verify + import + write checkpoint): {statistics.median(first):.2f} s")
    print(f"  second use (cached checkpoint):                            {statistics.median(second) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
