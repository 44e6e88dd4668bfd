"""NMS where a Mask R-CNN keeps only the first survivors: on a prefix of the boxes (``first_kept``) vs on
all of them (``batched_nms(...)[:k]``), on the inputs of one real forward.

Runs one R50-FPN forward (random weights: the RPN's objectness is flat, so NMS suppresses few proposals
and ~25,700 reach NMS per image at test size 1024) and records the arguments of every ``first_kept``
call: the RPN's proposal selection (``post_nms_top_n``, 3,000) and the box head's detection selection
(``detections_per_img``, 1,000). Each is then timed both ways (median of ``--repeats``) and the kept boxes
compared (the same boxes; their order may differ only among tied scores). A last row does the same on
synthetic proposals crowded around cells, as a trained RPN gives them, where NMS suppresses most boxes
and longer prefixes must be tried. On a GPU the figure that
matters is not the NMS arithmetic but torchvision's reduction of the suppression mask, one box after
the other in one thread block: its length is the number of boxes given.

    python benchmarks/bench_nms.py [--device cpu|cuda] [--test-size 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import boxes as box_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))


def record_calls(engine, images) -> list[tuple[str, tuple]]:
    """``(where, (boxes, scores, idxs, iou_threshold, k))`` of every ``first_kept`` call of one forward."""
    import napari_sartorius.models.detection_nms as dn
    import napari_sartorius.models.rpn as rpn

    calls = []
    real = dn.first_kept

    def recording(where):
        def call(boxes, scores, idxs, iou_threshold, k):
            calls.append((where, (boxes.clone(), scores.clone(), idxs.clone(), iou_threshold, k)))
            return real(boxes, scores, idxs, iou_threshold, k)
        return call

    rpn.first_kept, dn.first_kept = recording("RPN proposals"), recording("box head detections")
    try:
        engine.predict_batch(images)
    finally:
        rpn.first_kept, dn.first_kept = real, real
    return calls


def crowded_proposals(n: int, cells: int, device: torch.device, seed: int = 0):
    """``n`` proposals jittered around ``cells`` cells of 10-40 px in a 1024 x 1408 image, 5 levels, as a
    trained RPN's crowd around each cell: NMS suppresses most of them, so a prefix of ``2k`` boxes
    rarely keeps ``k`` and longer prefixes are tried."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(cells, 2, generator=g) * torch.tensor([1408.0, 1024.0])
    half = 5 + torch.rand(cells, 2, generator=g) * 15
    of = torch.randint(0, cells, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g) * half[of].repeat(1, 2) * 0.08
    boxes = torch.cat([centre[of] - half[of], centre[of] + half[of]], 1) + jitter
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:] - 1), boxes[:, 2:]], 1)
    scores, levels = torch.randn(n, generator=g) * 3, torch.randint(0, 5, (n,), generator=g)
    return boxes.to(device), scores.to(device), levels.to(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> None:
    from bench_gpu import make_engine, make_images

    from napari_sartorius.models.detection_nms import first_kept

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--test-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engine = make_engine(args.device, args.test_size, 0, amp=False, detections=1000)
    calls = record_calls(engine, make_images(1))
    print(f"R50-FPN, random weights, one 520 x 704 image at test size {args.test_size}, on {args.device}"
          f"{'' if device.type == 'cuda' else f', {args.threads} thread(s)'}; median of {args.repeats}")
    boxes, scores, idxs = crowded_proposals(25_000, 800, device)
    calls.append(("crowded synthetic proposals (800 cells)", (boxes, scores, idxs, 0.7, 3000)))
    for where, (boxes, scores, idxs, thr, k) in calls:
        t_all, everything = timed(lambda: box_ops.batched_nms(boxes, scores, idxs, thr), args.repeats, device)
        t_prefix, got = timed(lambda: first_kept(boxes, scores, idxs, thr, k), args.repeats, device)
        want = everything[:k]
        same = set(got.tolist()) == set(want.tolist()) and torch.equal(scores[got], scores[want])
        print(f"{where}: {len(boxes)} boxes, {len(everything)} survive NMS, first {k} kept: "
              f"all boxes {t_all * 1000:.1f} ms, prefix {t_prefix * 1000:.1f} ms ({t_prefix / t_all:.2f}x); "
              f"{'the same boxes' if same else 'DIFFERENT boxes'}")


if __name__ == "__main__":
    main()
