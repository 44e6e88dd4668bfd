"""Does the review queue pay? A simulated person fixes k cells per image, chosen three ways.

For every annotated image (the real cort images in ``../shared/data/real`` beside the repository when
they are there, and synthetic images of the three styles), the weight-free engine is run with TTA
(every variant is a source, so fusion gives each cell an uncertainty), the result is post-processed
with the default settings of the image's cell type, and a simulated person then fixes ``k`` cells
(k in 5, 10, 20, 50) chosen

* (a) by uncertainty, most uncertain first,
* (b) by score, lowest first,
* (c) at random (mean over ``--random-repeats`` draws),

where fixing a predicted cell replaces it by its best-matching true cell (highest IoU among the true
cells it overlaps that no other cell already stands for: matched at IoU >= 0.5 by another predicted
cell, or placed by an earlier fix), and deletes it when there is none (a false cell, or a fragment of
a cell that another prediction already has). It prints the competition score (mean over images) after each
``k``, and the AUROC of the uncertainty and of (1 - score) for "this prediction is wrong" (no true
cell at IoU >= 0.5), over all predicted cells of each group, and per image its score beside its mean
uncertainty (what ``summary.csv`` ranks images by) with their rank correlation.

``--tune`` searches the weights of the combined uncertainty (``UNCERTAINTY_WEIGHTS``) on *other*
synthetic images only (seeds 100+) and prints the best; the real images never take part in tuning.
``--cost`` times fusion with and without the uncertainty on 12 simulated sources of an 800-cell image
(target: the uncertainty costs under 10 % of fusion).

    python benchmarks/bench_review.py [--tta multiscale] [--synthetic 2] [--tune] [--cost]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np

KS = (5, 10, 20, 50)
REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


# -- data ------------------------------------------------------------------------------------------
def real_images():
    """[(name, image uint8, truth labels, cell type)] of the annotated real images (empty when absent)."""
    if not (REAL / "coco.json").is_file():
        return []
    from napari_sartorius.cleaning import clean_annotations
    from napari_sartorius.io import load_annotations
    from napari_sartorius.io.images import read_image

    aset = load_annotations(REAL / "coco.json")
    out = []
    for im in aset:
        inst, _ = clean_annotations(im.instances, fill_holes=False, min_fragment=0, resolve_overlaps=True, min_area=1)
        image = read_image(REAL / "images" / (im.file_name or f"{im.image_id}.png"))
        out.append((f"real {im.image_id}", image, inst.to_label_image(), im.cell_type or "cort"))
    return out


def synthetic_images(n_per_style: int, seed0: int = 0):
    from napari_sartorius.synthetic import make_sample

    out = []
    for style in ("cort", "shsy5y", "astro"):
        for k in range(n_per_style):
            s = make_sample(style, seed=seed0 + k)
            out.append((f"synthetic {style} {seed0 + k}", s.image, s.labels, style))
    return out


# -- predictions -----------------------------------------------------------------------------------
def predict(image, cell_type, tta, scales):
    """Fused raw Instances (with the uncertainty columns) of the weight-free engine under TTA."""
    from napari_sartorius.classical import ClassicalEngine, ClassicalSettings
    from napari_sartorius.inference.segment import run_to_completion, segment_image

    engine = ClassicalEngine(ClassicalSettings(cell_type=cell_type))
    return run_to_completion(segment_image(image, [engine], tta=tta, scales=scales))


def cells_of(raw, cell_type):
    """Post-processed labels and per-cell arrays (score, the uncertainty parts) in label order."""
    from napari_sartorius.postprocess import PostprocessSettings, postprocess

    res = postprocess(raw, PostprocessSettings(cell_type=cell_type))
    f = res.features
    parts = {k: np.asarray(f[k], np.float64) for k in ("score", "uncertainty", "found", "mask_iou", "score_spread")}
    return res.labels, parts


def overlaps(pred, gt):
    """Per predicted label (1..K): a list of (IoU, true label) of the true cells it overlaps, best first."""
    from napari_sartorius.metrics import sparse_ious

    k = int(pred.max())
    pi, gi, iou, _, _ = sparse_ious(pred, gt)
    # sparse_ious indexes labels in increasing id order (ids of a postprocess result are 1..K)
    pred_ids = np.unique(pred[pred > 0])
    gt_ids = np.unique(gt[gt > 0])
    out = [[] for _ in range(k)]
    for p, g, v in zip(pred_ids[pi], gt_ids[gi], iou):
        out[p - 1].append((float(v), int(g)))
    for lst in out:
        lst.sort(key=lambda t: (-t[0], t[1]))
    return out


def fix(pred, gt, chosen, over):
    """The labels after fixing the ``chosen`` labels (1-based), as the module docstring says."""
    out = pred.copy()
    claimed = {lst[0][1]: lab for lab, lst in enumerate(over, 1) if lst and lst[0][0] >= 0.5}
    for lab in chosen:
        out[out == lab] = 0
        for _, g in over[lab - 1]:
            if claimed.get(g, lab) == lab:
                claimed[g] = -lab  # placed by a fix
                out[gt == g] = lab
                break
    return out


def auroc(values, wrong):
    """Area under the ROC curve of ``values`` for the positives ``wrong`` (ties count half); None when
    one class is absent."""
    values = np.asarray(values, np.float64)
    wrong = np.asarray(wrong, bool)
    n1, n0 = int(wrong.sum()), int((~wrong).sum())
    if n1 == 0 or n0 == 0:
        return None
    from scipy.stats import rankdata

    r = rankdata(values)
    return float((r[wrong].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# -- the simulation --------------------------------------------------------------------------------
def simulate(items, repeats: int):
    from napari_sartorius.metrics import competition_score

    rows = {"uncertainty": {}, "lowest score": {}, "random": {}}
    base = []
    all_u, all_s, all_wrong = [], [], []
    for name, pred, gt, parts in items:
        over = overlaps(pred, gt)
        best = np.array([lst[0][0] if lst else 0.0 for lst in over])
        wrong = best < 0.5
        all_u.append(parts["uncertainty"])
        all_s.append(1.0 - parts["score"])
        all_wrong.append(wrong)
        n = len(best)
        labels = np.arange(1, n + 1)
        base.append(competition_score(pred, gt))
        orders = {
            "uncertainty": labels[np.lexsort((labels, -parts["uncertainty"]))],
            "lowest score": labels[np.lexsort((labels, parts["score"]))],
        }
        for k in KS:
            for how, order in orders.items():
                rows[how].setdefault(k, []).append(competition_score(fix(pred, gt, order[:k], over), gt))
            rng = np.random.default_rng(k)
            draws = [competition_score(fix(pred, gt, rng.permutation(labels)[:k], over), gt) for _ in range(repeats)]
            rows["random"].setdefault(k, []).append(float(np.mean(draws)))
    u, s, w = (np.concatenate(a) if a else np.zeros(0) for a in (all_u, all_s, all_wrong))
    simulate.per_image = [(b, float(np.mean(q["uncertainty"])) if len(q["uncertainty"]) else float("nan"))
                          for b, (*_, q) in zip(base, items)]
    return float(np.mean(base)), {h: {k: float(np.mean(v)) for k, v in r.items()} for h, r in rows.items()}, \
        auroc(u, w), auroc(s, w), int(w.sum()), len(w)


def print_table(title, items, repeats):
    if not items:
        print(f"\n{title}: no images")
        return
    base, rows, au_u, au_s, n_wrong, n = simulate(items, repeats)
    print(f"\n{title}: {len(items)} image(s), {n} predicted cells, {n_wrong} wrong (no true cell at IoU >= 0.5)")
    print(f"  competition score before fixing: {base:.3f}")
    print("  cells fixed per image   " + "  ".join(f"k={k:<5d}" for k in KS))
    for how, r in rows.items():
        print(f"  by {how:<20s} " + "  ".join(f"{r[k]:.3f}  " for k in KS))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"  AUROC for 'prediction is wrong': uncertainty {fmt(au_u)}, 1 - score {fmt(au_s)}")
    pairs = [(b, m) for b, m in simulate.per_image if np.isfinite(m)]
    if len(pairs) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([b for b, _ in pairs], [m for _, m in pairs])[0]
        print(f"  images: score vs mean uncertainty " + ", ".join(f"{b:.3f}/{m:.3f}" for b, m in pairs)
              + f"; Spearman {rho:.2f} (negative: the uncertain images are the bad ones)")


# -- tuning and cost ---------------------------------------------------------------------------------
def tune(items):
    """Grid-search the combined value's weights for AUROC on ``items`` (synthetic only)."""
    from napari_sartorius.inference.uncertainty import combine

    wrong = np.concatenate([
        np.array([lst[0][0] if lst else 0.0 for lst in overlaps(p, g)]) < 0.5 for _, p, g, _ in items
    ])
    parts = {k: np.concatenate([q[k] for *_, q in items]) for k in ("found", "mask_iou", "score_spread")}
    grid = (0.0, 0.5, 1.0, 2.0, 4.0)
    results = []
    for w in itertools.product(grid, repeat=3):
        if sum(w) == 0:
            continue
        u = combine(parts["found"], parts["mask_iou"], parts["score_spread"], w)
        results.append((auroc(u, wrong) or 0.0, w))
    results.sort(key=lambda t: (-t[0], t[1]))
    print(f"\ntuning on {len(items)} synthetic image(s), {len(wrong)} cells, {int(wrong.sum())} wrong:")
    for a, w in results[:5]:
        print(f"  weights (found, mask_iou, score agreement) {w}: AUROC {a:.3f}")
    for w in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)):
        u = combine(parts["found"], parts["mask_iou"], parts["score_spread"], w)
        print(f"  weights {w}: AUROC {auroc(u, wrong):.3f}")


def cost(repeats: int = 7):
    from scipy import ndimage

    from napari_sartorius.inference.ensemble import fuse_instances
    from napari_sartorius.instances import Instances
    from napari_sartorius.synthetic import make_sample

    gt = make_sample("shsy5y", seed=0, n_cells=800).instances
    rng = np.random.default_rng(0)
    sources = []
    for _ in range(12):  # 3 models x 4 TTA variants: each misses ~10 % of the cells, some masks shrink
        keep = [i for i in range(len(gt)) if rng.random() >= 0.1]
        masks = []
        for i in keep:
            m = gt.masks[i] > 0
            if rng.random() < 0.3:
                m = ndimage.binary_erosion(m)
            masks.append(m.astype(np.float32) * np.float32(rng.uniform(0.6, 1.0)))
        sources.append(
            Instances(gt.image_size, gt.boxes[keep] + rng.normal(0, 1, (len(keep), 4)), rng.uniform(0.2, 1, len(keep)),
                      np.zeros(len(keep), np.int64), masks, gt.mask_origins[keep])
        )
    n = sum(len(s) for s in sources)
    print(f"\nfusion cost: 12 sources, {n} candidates of an {len(gt)}-cell image (CPU time, best of {repeats}: "
          "the machine may be shared, and contention only adds time)")
    for method in ("wbf", "nms"):
        t = {False: [], True: []}
        for _ in range(repeats):
            for u in (False, True):
                t0 = time.process_time()
                fuse_instances(sources, method=method, uncertainty=u)
                t[u].append(time.process_time() - t0)
        off, on = min(t[False]), min(t[True])
        print(f"  {method}: fusion {off * 1000:.0f} ms, with uncertainty {on * 1000:.0f} ms (+{100 * (on - off) / off:.0f} %)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tta", default="multiscale", help="TTA mode of the weight-free engine (default multiscale)")
    ap.add_argument("--scales", default="0.8,0.9,1.0,1.1,1.25", help="scales for multiscale TTA")
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic images per style (default 2)")
    ap.add_argument("--random-repeats", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="tune the combined value on synthetic seeds 100+")
    ap.add_argument("--cost", action="store_true", help="time the uncertainty against fusion")
    ap.add_argument("--no-simulation", action="store_true")
    args = ap.parse_args(argv)
    scales = tuple(float(v) for v in args.scales.split(",")) if args.tta == "multiscale" else None
    from napari_sartorius.inference.uncertainty import UNCERTAINTY_WEIGHTS

    print(f"weight-free engine, TTA {args.tta}{' ' + str(scales) if scales else ''}; uncertainty weights {UNCERTAINTY_WEIGHTS}")

    def run(images):
        items = []
        for name, image, gt, ctype in images:
            t0 = time.perf_counter()
            raw = predict(image, ctype, args.tta, scales)
            pred, parts = cells_of(raw, ctype)
            items.append((name, pred, gt, parts))
            print(f"  {name}: {int(pred.max())} cells ({int(gt.max())} true) in {time.perf_counter() - t0:.1f} s", flush=True)
        return items

    if args.tune:
        tune(run(synthetic_images(max(args.synthetic, 1), seed0=100)))
    if not args.no_simulation:
        real = run(real_images())
        synth = run(synthetic_images(args.synthetic))
        print_table("real cort images (../shared/data/real)", real, args.random_repeats)
        for style in ("cort", "shsy5y", "astro"):
            print_table(f"synthetic {style}", [it for it in synth if f" {style} " in it[0]], args.random_repeats)
        print_table("all synthetic", synth, args.random_repeats)
    if args.cost:
        cost()


if __name__ == "__main__":
    main()
