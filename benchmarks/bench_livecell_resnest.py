"""CPU time and peak memory of LIVECell's anchor-based architecture on one 520 x 704 image.

Builds ``cascade_mask_rcnn_ResNeSt_200_FPN`` from the bundled LIVECell config
(``anchor_based/livecell_config.yaml``, as ``import-detectron2`` does: test size 800, so the network sees
800 x 1083; up to 3000 proposals and 3000 detections) with random weights whose BatchNorm statistics are
taken from the image (otherwise a random 200-layer body overflows), and times ``MaskRCNNEngine.predict``
on one image: a real cort/SH-SY5Y sample from ``<repo>/../shared/data/real/images`` when present,
else a synthetic 520 x 704 one. Random heads score every box alike, so ``--detections`` caps the
instances that reach the mask head (a dense LIVECell image has a few hundred cells).

Prints seconds per image (``--runs`` runs after nothing else: the first run is timed too, as the
first image of a session is), the instance count, the process's peak resident memory and the weights'
size.

    python benchmarks/bench_livecell_resnest.py [--threads 1] [--detections 500] [--runs 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load_image() -> tuple[np.ndarray, str]:
    folder = REPO.parent / "shared" / "data" / "real" / "images"
    files = sorted(folder.glob("*.png")) + sorted(folder.glob("*.tif")) if folder.is_dir() else []
    if files:
        from skimage import io

        img = io.imread(files[0])
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        return img[..., :3].astype(np.uint8), files[0].name
    rng = np.random.default_rng(0)
    img = (rng.normal(128, 12, size=(520, 704))).clip(0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2), "synthetic noise 520 x 704"


def calibrate_batchnorm(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Every BatchNorm takes the mean / variance of its input on (a quarter-size copy of) ``image``."""
    done: set[int] = set()

    def hook(mod, args):
        if id(mod) not in done:
            done.add(id(mod))
            x = args[0]
            if x[:, 0].numel() > 1:
                mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
                mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) + 1e-3)

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    small = torch.nn.functional.interpolate(image[None], scale_factor=0.25, mode="bilinear")[0]
    try:
        with torch.no_grad():
            model([small])
    finally:
        for h in hooks:
            h.remove()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--detections", type=int, default=500, help="cap on instances (config: 3000)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    from napari_sartorius.models.architectures import build_model
    from napari_sartorius.models.detectron2_import import detectron2_model_config
    from napari_sartorius.models.predictor import MaskRCNNEngine

    config = detectron2_model_config("anchor_based/livecell_config.yaml", ("cell",))
    config = config.replace(detections_per_img=args.detections, score_thresh_test=0.0)
    torch.manual_seed(0)
    model = build_model(config).eval()
    image, name = load_image()
    calibrate_batchnorm(model, torch.from_numpy(image.transpose(2, 0, 1).copy()).float())
    engine = MaskRCNNEngine(model, config)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        result = engine.predict(image)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"image: {name} {image.shape[0]} x {image.shape[1]} (network input {config.min_size_test} px short side)")
    print(f"threads: {args.threads}  instances: {len(result)} (cap {args.detections})")
    print(f"seconds per image: {' '.join(f'{t:.1f}' for t in times)}")
    print(f"peak resident memory: {peak_mb:.0f} MiB  (weights {weights_mb:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
