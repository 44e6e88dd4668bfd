"""CPU time of an imported model against detectron2 itself, on the same weights and images.

Needs detectron2 importable (built from its own repository; it is never a dependency). For each
architecture asked for, it builds detectron2's model from the bundled model-zoo config with cell-sized
anchors (``[[8], [16], [32], [64], [128]]``, ratios 0.25-4; C4: one level with all five sizes), saves
its state dict as detectron2 does, imports it with ``load_detectron2_model`` and times both on the same
images given at the network's input size (``MIN_SIZE_TEST: 0``, no resizing on either side):

* ``to results`` (always): detectron2 ``model(inputs)`` (masks pasted into full-image arrays,
  thresholded) against ``MaskRCNNEngine.predict`` (masks pasted into crops);
* ``network`` (``--network``): detectron2 ``model.inference(..., do_postprocess=False)`` against the
  project model's forward (boxes, scores, M x M mask probabilities).

Weights (``--weights``):

* ``many`` (default): trained-like weights giving many instances. The random weights are conditioned
  as the parity test does (``tests/models/d2_parity_helpers.condition_``: every FrozenBN takes its
  input statistics on the first image, head layers give the logit spreads of trained models, mask
  heads predict smooth shapes), ``SCORE_THRESH_TEST`` is detectron2's 0.05 and
  ``TEST.DETECTIONS_PER_IMAGE`` is ``--detections`` (default 300): both sides return that many
  instances per image, as a trained model does on a crowded SH-SY5Y image (~340 cells on average), so
  the mask head and the pasting of 300 masks are timed, not only the backbone.
* ``few``: the earlier comparison: decisive heads, score threshold 0.001, 1000 detections (random
  weights give a handful of instances).

Images (``--images``): the real 520 x 704 PNGs of ``<repo>/../shared/data/real`` (``images/`` and
``unlabelled/``) when that folder is there, else one synthetic SH-SY5Y image. The project's model runs
as an engine loaded from a checkpoint runs it on the CPU (``fast``: FrozenBN folded, channels-last,
:mod:`napari_sartorius.models.fast_inference`); ``--plain`` times it without that preparation.

Each run times every image on both sides, alternating which side goes first (the machine may be shared:
both see the same load); one warm-up pass first. Times are CPU seconds of the process (with one torch
thread, the work done: the figure that stays put on a shared machine) and wall seconds. Per image it
prints the instance counts of both (they must be equal: same proposals, same detections) and the median
times; then the median over images of the per-image ratio project / detectron2, its range, and the load
average before and after.

    python benchmarks/bench_detectron2.py [--arch mask_rcnn_R_50_FPN] [--weights many|few] [--detections 300]
        [--runs 3] [--threads 1] [--images a.png b.png] [--network] [--plain]
"""

from __future__ import annotations

import argparse
import os
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
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def write_config(folder: Path, zoo_name: str, *, score_thresh: float, detections: int) -> Path:
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
            "ROI_HEADS": {"NUM_CLASSES": 3, "SCORE_THRESH_TEST": score_thresh},
            "ANCHOR_GENERATOR": {
                "SIZES": [[8, 16, 32, 64, 128]] if c4 else [[8], [16], [32], [64], [128]],
                "ASPECT_RATIOS": [[0.25, 0.5, 1.0, 2.0, 4.0]],
            },
        },
        "INPUT": {"MIN_SIZE_TEST": 0},
        "TEST": {"DETECTIONS_PER_IMAGE": detections},
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


def trained_like(model: torch.nn.Module, inputs) -> None:
    """The parity test's conditioning of random weights (``tests/models/d2_parity_helpers.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
    from d2_parity_helpers import condition_

    condition_(model, inputs, 0)


def load_images(paths: list[str] | None) -> list[tuple[str, np.ndarray]]:
    """``(name, (H, W, 3) uint8 RGB)`` of each image: the paths given, else the real PNGs, else one
    synthetic SH-SY5Y image."""
    from skimage import io

    if not paths and REAL.is_dir():
        paths = sorted(str(p) for sub in ("images", "unlabelled") for p in (REAL / sub).glob("*.png"))
    if not paths:
        from napari_sartorius.synthetic import make_sample

        return [("synthetic shsy5y", np.repeat(make_sample("shsy5y", seed=0).image[..., None], 3, axis=2))]
    out = []
    for p in paths:
        img = np.asarray(io.imread(p))
        if img.ndim == 3:
            img = img[..., :3]
        else:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append((Path(p).stem, img.astype(np.uint8)))
    return out


def timed(fn) -> tuple[float, float]:
    """``(CPU seconds of this process, wall seconds)`` of ``fn()``. With one torch thread the CPU time is
    the work done; the wall time also counts the waits of a machine shared with other jobs."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def bench(arch: str, images, args) -> list[tuple[float, float]]:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build_model

    from napari_sartorius.models.detectron2_import import load_detectron2_model
    from napari_sartorius.models.predictor import MaskRCNNEngine

    many = args.weights == "many"
    d2_model = engine = model = None

    def sides(rgb):
        h, w = rgb.shape[:2]
        bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))).float()
        inputs = [{"image": bgr, "height": h, "width": w}]
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
        full = (lambda: d2_model(inputs), lambda: engine.predict(rgb))
        net = (lambda: d2_model.inference(inputs, do_postprocess=False), lambda: model([x]))
        return inputs, full, net

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = write_config(
            Path(tmp), ZOO[arch], score_thresh=0.05 if many else 0.001, detections=args.detections if many else 1000
        )
        cfg = get_cfg()
        cfg.merge_from_file(str(cfg_path))
        torch.manual_seed(0)
        d2_model = d2_build_model(cfg).eval()
        if many:
            trained_like(d2_model, sides(images[0][1])[0])
        else:
            decisive_heads(d2_model)
        weights = Path(tmp) / "model_final.pth"
        torch.save({"model": d2_model.state_dict()}, weights)
        model, config, _ = load_detectron2_model(weights, cfg_path, ("shsy5y", "astro", "cort"))
    # as a checkpoint's engine runs on the CPU: FrozenBN folded, channels-last (models/fast_inference.py)
    engine = MaskRCNNEngine(model, config, fast=not args.plain)

    ratios = []
    with torch.inference_mode():
        _, full, net = sides(images[0][1])
        for fn in full + (net if args.network else ()):
            fn()  # warm-up
        for name, rgb in images:
            inputs, full, net = sides(rgb)
            n_d2, n_ours = len(d2_model(inputs)[0]["instances"]), len(engine.predict(rgb))
            t = {"full": ([], []), "net": ([], [])}
            for run in range(args.runs):
                order = (0, 1) if run % 2 == 0 else (1, 0)  # alternate who goes first
                for kind, fns in (("full", full),) + ((("net", net),) if args.network else ()):
                    for side in order:
                        t[kind][side].append(timed(fns[side]))
            (d2_t, d2_w), (ours_t, ours_w) = (np.median(np.array(v), axis=0) for v in t["full"])
            ratios.append((ours_t / d2_t, ours_w / d2_w))
            line = (f"  {name:22s} {rgb.shape[0]}x{rgb.shape[1]}, instances detectron2 {n_d2} / project {n_ours}"
                    f"{'' if n_d2 == n_ours else ' (DIFFERENT)'} | to results, CPU s: detectron2 {d2_t:5.2f}, "
                    f"project {ours_t:5.2f}, ratio {ours_t / d2_t:4.2f} (wall {d2_w:5.2f} / {ours_w:5.2f} s, "
                    f"ratio {ours_w / d2_w:4.2f})")
            if args.network:
                (d2_n, _), (ours_n, _) = (np.median(np.array(v), axis=0) for v in t["net"])
                line += f" | network, CPU s: detectron2 {d2_n:5.2f}, project {ours_n:5.2f}, ratio {ours_n / d2_n:4.2f}"
            print(line, flush=True)
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mask_rcnn_R_50_FPN"], choices=sorted(ZOO))
    parser.add_argument("--weights", choices=("many", "few"), default="many",
                        help="many: trained-like, --detections instances per image (default); few: random heads")
    parser.add_argument("--detections", type=int, default=300, help="instances per image with --weights many")
    parser.add_argument("--images", nargs="*", help="images to time (default: the real PNGs of ../shared/data/real)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per image and side (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--network", action="store_true", help="also time the bare networks")
    parser.add_argument("--plain", action="store_true",
                        help="time the project's model without the CPU preparation (FrozenBN folding, channels-last)")
    args = parser.parse_args(argv)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("detectron2 is not importable here: nothing to compare against (build it from its repository)")
        return 0
    torch.set_num_threads(args.threads)
    images = load_images(args.images)
    load0 = os.getloadavg()[0]
    print(f"CPU, {args.threads} thread(s), {os.cpu_count()} cores, weights '{args.weights}', {len(images)} image(s), "
          f"median of {args.runs} alternating run(s) after a warm-up; load average {load0:.1f}")
    for arch in args.arch:
        print(arch, flush=True)
        ratios = bench(arch, images, args)
        cpu, wall = (sorted(r[i] for r in ratios) for i in (0, 1))
        print(f"{arch}: time ratio project / detectron2 (to results), median over {len(ratios)} image(s): "
              f"CPU time {statistics.median(cpu):.2f} (range {cpu[0]:.2f}-{cpu[-1]:.2f}), "
              f"wall {statistics.median(wall):.2f} (range {wall[0]:.2f}-{wall[-1]:.2f}); "
              f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
