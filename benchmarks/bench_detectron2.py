"""Forward time of an imported model against detectron2 itself, on the same weights and image.

Needs detectron2 importable (built from its own repository; it is never a dependency). For each
architecture asked for, it builds detectron2's model from the bundled model-zoo config with cell-sized
anchors (``[[8], [16], [32], [64], [128]]``, ratios 0.25-4; C4: one level with all five sizes), 1000
detections per image and random weights, saves the state dict as detectron2 does, imports it with
``load_detectron2_model`` and times, on one synthetic 520 x 704 SH-SY5Y image given at the network's
input size (no resizing on either side):

* ``network``: detectron2 ``model.inference(..., do_postprocess=False)`` against the project model's
  forward (boxes, scores, M x M mask probabilities);
* ``to results``: detectron2 ``model(inputs)`` (masks pasted into full-image arrays, thresholded)
  against ``MaskRCNNEngine.predict`` (masks pasted into crops).

The project's model runs as an engine loaded from a checkpoint runs it on the CPU (FrozenBN folded into
the convolutions, channels-last weights, :mod:`napari_sartorius.models.cpu_fast`); ``--plain`` times it
without that preparation.

It prints the median of ``--runs`` runs (after one warm-up) and the ratio project / detectron2, with
the instance counts of both (equal when both process the same proposals).

    python benchmarks/bench_detectron2.py [--arch mask_rcnn_R_50_FPN mask_rcnn_R_50_C4] [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ZOO = {
    "mask_rcnn_R_50_FPN": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "mask_rcnn_R_50_C4": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml",
    "mask_rcnn_R_101_FPN": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
    "mask_rcnn_R_101_C4": "COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml",
    "mask_rcnn_X_101_32x8d_FPN": "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
    "cascade_mask_rcnn_X_152_32x8d_FPN": "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml",
}


def write_config(folder: Path, zoo_name: str) -> Path:
    from napari_sartorius.models.d2_config import BUNDLED_CONFIGS

    leaf = dict(BUNDLED_CONFIGS[zoo_name])
    base = leaf.pop("_BASE_")
    (folder / "zoo").mkdir(parents=True, exist_ok=True)
    (folder / base.split("/")[-1]).write_text(yaml.safe_dump(BUNDLED_CONFIGS[base.split("/")[-1]]))
    (folder / "zoo" / "model.yaml").write_text(yaml.safe_dump(dict(leaf, _BASE_=base)))
    c4 = "_C4_" in zoo_name
    test = {
        "_BASE_": "model.yaml",
        "MODEL": {
            "DEVICE": "cpu",
            "ROI_HEADS": {"NUM_CLASSES": 3, "SCORE_THRESH_TEST": 0.001},  # many instances, as SH-SY5Y
            "ANCHOR_GENERATOR": {
                "SIZES": [[8, 16, 32, 64, 128]] if c4 else [[8], [16], [32], [64], [128]],
                "ASPECT_RATIOS": [[0.25, 0.5, 1.0, 2.0, 4.0]],
            },
        },
        "INPUT": {"MIN_SIZE_TEST": 0},
        "TEST": {"DETECTIONS_PER_IMAGE": 1000},
    }
    path = folder / "zoo" / "test.yaml"
    path.write_text(yaml.safe_dump(test))
    return path


def decisive_heads(model: torch.nn.Module) -> None:
    """Redraw the objectness and class-score layers with weights ~ 1 / sqrt(fan_in): detectron2's
    initial ones (std 0.01) give every anchor the same score, and the two implementations would then
    break the ties differently, so they would not process the same proposals."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("objectness_logits", "cls_score")):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 3.0 / fan_in**0.5)


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(arch: str, runs: int, plain: bool = False) -> None:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build_model

    from napari_sartorius.models.detectron2_import import load_detectron2_model
    from napari_sartorius.models.predictor import MaskRCNNEngine
    from napari_sartorius.synthetic import make_sample

    gray = make_sample("shsy5y", seed=0).image
    rgb = np.repeat(gray[..., None], 3, axis=2)
    h, w = gray.shape
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = write_config(Path(tmp), ZOO[arch])
        cfg = get_cfg()
        cfg.merge_from_file(str(cfg_path))
        torch.manual_seed(0)
        d2_model = d2_build_model(cfg).eval()
        decisive_heads(d2_model)
        weights = Path(tmp) / "model_final.pth"
        torch.save({"model": d2_model.state_dict()}, weights)
        model, config, _ = load_detectron2_model(weights, cfg_path, ("shsy5y", "astro", "cort"))
    # as a checkpoint's engine runs on the CPU: FrozenBN folded, channels-last (models/cpu_fast.py)
    engine = MaskRCNNEngine(model, config, cpu_fast=not plain)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))).float()
    inputs = [{"image": bgr, "height": h, "width": w}]
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()

    with torch.inference_mode():
        n_d2 = len(d2_model(inputs)[0]["instances"])
        n_ours = len(engine.predict(rgb))
        t_d2_net = median_time(lambda: d2_model.inference(inputs, do_postprocess=False), runs)
        t_net = median_time(lambda: model([x]), runs)
        t_d2_full = median_time(lambda: d2_model(inputs), runs)
    t_full = median_time(lambda: engine.predict(rgb), runs)
    print(
        f"{arch:36s} {h}x{w}, {n_d2} / {n_ours} instances | network: detectron2 {t_d2_net:6.2f} s, "
        f"project {t_net:6.2f} s, ratio {t_net / t_d2_net:4.2f} | to results: detectron2 {t_d2_full:6.2f} s, "
        f"project {t_full:6.2f} s, ratio {t_full / t_d2_full:4.2f}",
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mask_rcnn_R_50_FPN", "mask_rcnn_R_50_C4"], choices=sorted(ZOO))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--plain", action="store_true",
                        help="time the project's model without the CPU preparation (FrozenBN folding, channels-last)")
    args = parser.parse_args(argv)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("detectron2 is not importable here: nothing to compare against (build it from its repository)")
        return 0
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} thread(s), median of {args.runs} runs after a warm-up")
    for arch in args.arch:
        bench(arch, args.runs, args.plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
