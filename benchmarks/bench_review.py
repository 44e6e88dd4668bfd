"""Does the review queue pay? A simulated person fixes k cells per image, chosen four ways.

For every annotated image (the real cort images in ``../shared/data/real`` beside the repository when
they are there, and synthetic images of the three styles), the weight-free engine is run under a
*source configuration* (``--sources``: ``multiscale``, 5-scale TTA; ``flips``, 4 flips; ``ensemble``,
three engines of diameters 0.85, 1, 1.15 x typical without TTA: every variant or engine is a source,
so fusion gives each cell an uncertainty), the result is post-processed with the default settings of
the image's cell type, and a simulated person then fixes ``k`` cells (k in 5, 10, 20, 50) chosen

* (a) by review priority, highest first (what the review panel does:
  :func:`napari_sartorius.inference.review_rank.review_priority`),
* (b) by uncertainty alone, most uncertain first,
* (c) by score, lowest first,
* (d) at random (mean over ``--random-repeats`` draws),

where fixing a predicted cell replaces it by its best-matching true cell (highest IoU among the true
cells it overlaps that no other cell already stands for: matched at IoU >= 0.5 by another predicted
cell, or placed by an earlier fix), and deletes it when there is none (a false cell, or a fragment of
a cell that another prediction already has). It prints the competition score (mean over images) after each
``k``; the AUROC of the priority, of the uncertainty and of (1 - score) for "this prediction is
wrong" (no true cell at IoU >= 0.5) over all predicted cells of each group, with a paired bootstrap
90 % interval of AUROC(priority) - AUROC(1 - score) (resampling cells, ``--bootstrap`` draws); the
precision of the top 20 cells of the group (pooled, the share of them that are wrong) and of the panel's
default flags (the top 20 % of each image's cells, at least 5); and per image its score beside its
mean uncertainty (what ``summary.csv`` ranks images by) with their rank correlation.

``--tune`` fits the priority's coefficients (``PRIORITY_COEFFICIENTS``) on *other* synthetic images
only (seeds 100-102 of each style, cort seeds 103-114) under all three source configurations, and
searches the weights of the combined uncertainty (``UNCERTAINTY_WEIGHTS``) on the multiscale ones;
the real images never take part in tuning. ``--cost`` times fusion with and without the uncertainty
on 12 simulated sources of an 800-cell image (target: the uncertainty costs under 10 % of fusion).

    python benchmarks/bench_review.py [--sources multiscale,flips,ensemble] [--synthetic 2] [--tune] [--cost]
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


def synthetic_images(n_per_style: int, seed0: int = 0, styles=("cort", "shsy5y", "astro")):
    from napari_sartorius.synthetic import make_sample

    out = []
    for style in styles:
        for k in range(n_per_style):
            s = make_sample(style, seed=seed0 + k)
            out.append((f"synthetic {style} {seed0 + k}", s.image, s.labels, style))
    return out


def fit_images():
    """The synthetic images the priority is fitted on (never those of the simulation, never real ones):
    seeds 100-102 of each style and cort seeds 103-114 (cort images hold ~15 cells, ~2 of them wrong)."""
    return synthetic_images(3, seed0=100) + synthetic_images(12, seed0=103, styles=("cort",))


# -- predictions -----------------------------------------------------------------------------------
SOURCES = ("multiscale", "flips", "ensemble")
MULTISCALE = (0.8, 0.9, 1.0, 1.1, 1.25)
DIAMETER_FACTORS = (0.85, 1.0, 1.15)


def predict(image, cell_type, sources):
    """Fused raw Instances (with the uncertainty columns) of the weight-free engine under ``sources``."""
    from napari_sartorius.classical import TYPICAL_DIAMETERS, ClassicalEngine, ClassicalSettings
    from napari_sartorius.inference.segment import run_to_completion, segment_image

    if sources == "ensemble":
        d = TYPICAL_DIAMETERS[cell_type]
        engines = [ClassicalEngine(ClassicalSettings(cell_type=cell_type, cell_diameter=d * f)) for f in DIAMETER_FACTORS]
        return run_to_completion(segment_image(image, engines, tta="none"))
    engine = ClassicalEngine(ClassicalSettings(cell_type=cell_type))
    scales = MULTISCALE if sources == "multiscale" else None
    return run_to_completion(segment_image(image, [engine], tta=sources, scales=scales))


def cells_of(raw, cell_type):
    """Post-processed labels and per-cell arrays (score, area, the uncertainty parts, the review
    priority) in label order."""
    from napari_sartorius.inference.review_rank import review_priority
    from napari_sartorius.postprocess import PostprocessSettings, postprocess

    res = postprocess(raw, PostprocessSettings(cell_type=cell_type))
    f = res.features
    parts = {k: np.asarray(f[k], np.float64) for k in ("score", "area", "uncertainty", "found", "mask_iou", "score_spread")}
    parts["priority"] = review_priority(parts["score"], parts["uncertainty"], parts["area"])
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


def wrong_of(pred, gt):
    """bool per predicted label (1..K): no true cell at IoU >= 0.5."""
    return np.array([lst[0][0] if lst else 0.0 for lst in overlaps(pred, gt)]) < 0.5


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

    from napari_sartorius.inference.review_rank import flag_top

    rows = {"review priority": {}, "uncertainty": {}, "lowest score": {}, "random": {}}
    base = []
    all_p, all_u, all_s, all_wrong, flagged = [], [], [], [], []
    for name, pred, gt, parts in items:
        over = overlaps(pred, gt)
        best = np.array([lst[0][0] if lst else 0.0 for lst in over])
        wrong = best < 0.5
        all_p.append(parts["priority"])
        all_u.append(parts["uncertainty"])
        all_s.append(1.0 - parts["score"])
        all_wrong.append(wrong)
        flagged.append({h: wrong[flag_top(v)] for h, v in
                        (("review priority", parts["priority"]), ("uncertainty", parts["uncertainty"]), ("1 - score", 1.0 - parts["score"]))})
        n = len(best)
        labels = np.arange(1, n + 1)
        base.append(competition_score(pred, gt))
        orders = {
            "review priority": labels[np.lexsort((labels, -parts["priority"]))],
            "uncertainty": labels[np.lexsort((labels, -parts["uncertainty"]))],
            "lowest score": labels[np.lexsort((labels, parts["score"]))],
        }
        for k in KS:
            for how, order in orders.items():
                rows[how].setdefault(k, []).append(competition_score(fix(pred, gt, order[:k], over), gt))
            rng = np.random.default_rng(k)
            draws = [competition_score(fix(pred, gt, rng.permutation(labels)[:k], over), gt) for _ in range(repeats)]
            rows["random"].setdefault(k, []).append(float(np.mean(draws)))
    p, u, s, w = (np.concatenate(a) if a else np.zeros(0) for a in (all_p, all_u, all_s, all_wrong))
    simulate.per_image = [(b, float(np.mean(q["uncertainty"])) if len(q["uncertainty"]) else float("nan"))
                          for b, (*_, q) in zip(base, items)]
    ranks = {
        h: (auroc(v, w), top_precision(v, w), v, np.concatenate([f[h] for f in flagged]) if flagged else np.zeros(0, bool))
        for h, v in (("review priority", p), ("uncertainty", u), ("1 - score", s))
    }
    return float(np.mean(base)), {h: {k: float(np.mean(v)) for k, v in r.items()} for h, r in rows.items()}, \
        ranks, w


def top_precision(values, wrong, k: int = 20):
    """Share of wrong cells among the ``k`` highest ``values`` (ties: the earlier cell first)."""
    values, wrong = np.asarray(values, np.float64), np.asarray(wrong, bool)
    if not len(values):
        return None
    order = np.lexsort((np.arange(len(values)), -values))[:k]
    return float(wrong[order].mean())


def bootstrap_difference(a, b, wrong, draws: int, seed: int = 0):
    """Paired bootstrap (cells resampled) 5th and 95th percentiles of AUROC(a) - AUROC(b)."""
    rng = np.random.default_rng(seed)
    n = len(wrong)
    diffs = []
    for _ in range(draws):
        i = rng.integers(0, n, n)
        x, y = auroc(a[i], wrong[i]), auroc(b[i], wrong[i])
        if x is not None and y is not None:
            diffs.append(x - y)
    return (float(np.percentile(diffs, 5)), float(np.percentile(diffs, 95))) if diffs else None


def print_table(title, items, repeats, draws=1000):
    if not items:
        print(f"\n{title}: no images")
        return
    base, rows, ranks, w = simulate(items, repeats)
    print(f"\n{title}: {len(items)} image(s), {len(w)} predicted cells, {int(w.sum())} wrong (no true cell at IoU >= 0.5)")
    print(f"  competition score before fixing: {base:.3f}")
    print("  cells fixed per image   " + "  ".join(f"k={k:<5d}" for k in KS))
    for how, r in rows.items():
        print(f"  by {how:<20s} " + "  ".join(f"{r[k]:.3f}  " for k in KS))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("  AUROC for 'prediction is wrong': " + ", ".join(f"{h} {fmt(r[0])}" for h, r in ranks.items()))
    print("  precision of the top 20 cells:    " + ", ".join(f"{h} {fmt(r[1])}" for h, r in ranks.items())
          + f" (base rate {fmt(float(w.mean()) if len(w) else None)})")
    n_flag = len(ranks["review priority"][3])
    print(f"  precision of the panel's default flags (top 20 % of each image, >= 5; {n_flag} cells): "
          + ", ".join(f"{h} {fmt(float(r[3].mean()) if len(r[3]) else None)}" for h, r in ranks.items()))
    ci = bootstrap_difference(ranks["review priority"][2], ranks["1 - score"][2], w, draws) if draws else None
    if ci is not None:
        print(f"  AUROC priority - (1 - score): 90 % bootstrap interval [{ci[0]:+.3f}, {ci[1]:+.3f}] ({draws} draws)")
    pairs = [(b, m) for b, m in simulate.per_image if np.isfinite(m)]
    if len(pairs) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([b for b, _ in pairs], [m for _, m in pairs])[0]
        print(f"  images: score vs mean uncertainty " + ", ".join(f"{b:.3f}/{m:.3f}" for b, m in pairs)
              + f"; Spearman {rho:.2f} (negative: the uncertain images are the bad ones)")


# -- tuning and cost ---------------------------------------------------------------------------------
def tune_priority(runs):
    """Fit the review priority's coefficients on ``runs`` (synthetic only) and print them."""
    from napari_sartorius.inference.review_rank import PRIORITY_COEFFICIENTS, fit_priority, priority_inputs

    x = np.concatenate([priority_inputs(q["score"], q["uncertainty"], q["area"]) for _, p, _, q in runs if p.max()])
    wrong = np.concatenate([wrong_of(p, g) for _, p, g, _ in runs if p.max()])
    b = fit_priority(x, wrong)
    print(f"\nreview priority fitted on {len(runs)} synthetic image runs, {len(wrong)} cells, {int(wrong.sum())} wrong:")
    print(f"  PRIORITY_COEFFICIENTS = {b} (stored: {PRIORITY_COEFFICIENTS})")


def tune(items):
    """Grid-search the combined value's weights for AUROC on ``items`` (synthetic only)."""
    from napari_sartorius.inference.uncertainty import combine

    wrong = np.concatenate([wrong_of(p, g) for _, p, g, _ in items])
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
    ap.add_argument("--sources", default="multiscale",
                    help=f"comma-separated source configurations among {', '.join(SOURCES)} (default multiscale)")
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic images per style (default 2)")
    ap.add_argument("--random-repeats", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the AUROC interval (0: none)")
    ap.add_argument("--tune", action="store_true", help="fit the priority (and the uncertainty weights) on synthetic seeds 100+")
    ap.add_argument("--cost", action="store_true", help="time the uncertainty against fusion")
    ap.add_argument("--no-simulation", action="store_true")
    args = ap.parse_args(argv)
    sources = [v.strip() for v in args.sources.split(",") if v.strip()]
    bad = [v for v in sources if v not in SOURCES]
    if bad:
        ap.error(f"--sources: unknown {', '.join(bad)}; choose among {', '.join(SOURCES)}")
    from napari_sartorius.inference.review_rank import PRIORITY_COEFFICIENTS
    from napari_sartorius.inference.uncertainty import UNCERTAINTY_WEIGHTS

    print(f"weight-free engine; uncertainty weights {UNCERTAINTY_WEIGHTS}; priority coefficients {PRIORITY_COEFFICIENTS}")

    def run(images, how):
        items = []
        for name, image, gt, ctype in images:
            t0 = time.perf_counter()
            raw = predict(image, ctype, how)
            pred, parts = cells_of(raw, ctype)
            items.append((name, pred, gt, parts))
            print(f"  {how} {name}: {int(pred.max())} cells ({int(gt.max())} true) in {time.perf_counter() - t0:.1f} s", flush=True)
        return items

    if args.tune:
        fits = {how: run(fit_images(), how) for how in SOURCES}
        tune_priority([it for how in SOURCES for it in fits[how]])
        tune([it for it in fits["multiscale"] if it[1].max()])
    if not args.no_simulation:
        for how in sources:
            desc = {"multiscale": f"5-scale TTA {MULTISCALE}", "flips": "4-flip TTA",
                    "ensemble": f"3 engines, diameters x {DIAMETER_FACTORS}, no TTA"}[how]
            print(f"\n===== sources: {how} ({desc}) =====")
            real = run(real_images(), how)
            synth = run(synthetic_images(args.synthetic), how)
            print_table(f"[{how}] real cort images (../shared/data/real)", real, args.random_repeats, args.bootstrap)
            for style in ("cort", "shsy5y", "astro"):
                print_table(f"[{how}] synthetic {style}", [it for it in synth if f" {style} " in it[0]], args.random_repeats, 0)
            print_table(f"[{how}] all synthetic", synth, args.random_repeats, args.bootstrap)
    if args.cost:
        cost()


if __name__ == "__main__":
    main()
