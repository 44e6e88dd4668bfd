"""Where one R50-FPN forward spends its time on a GPU: wall time per stage (transform, backbone + FPN,
RPN, box head, mask branch, pasting), fp32 vs fp16, for 1000 and 100 detections per image, with
cuDNN autotuning off (the default) and on; the host syncs of one fp16 batch (CUDA sync debug mode) and
its CUDA kernel launches; torch.profiler's top CUDA kernels and CPU ops of one fp16 batch. Engines are
prepared as checkpoint engines run (FrozenBN folded, channels-last).

    python benchmarks/profile_gpu.py [--batch 4] [--test-size 1024] [--out profile.txt]

Random weights, synthetic 520 x 704 SH-SY5Y images (as bench_gpu.py). CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def stage_times(engine, images, batch, reps=5):
    """Median seconds per batch of each stage, CUDA synchronised around each."""
    model = engine.model
    parts = {"backbone+fpn": model.backbone, "rpn": model.rpn, "roi_heads": model.roi_heads}
    seconds = {k: [] for k in parts}
    starts = {}
    hooks = []
    for name, module in parts.items():
        def pre(_m, _i, name=name):
            torch.cuda.synchronize()
            starts[name] = time.perf_counter()

        def post(_m, _i, _o, name=name):
            torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - starts[name])

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    totals = []
    try:
        engine.predict_batch(images[:batch])
        for k in seconds:
            seconds[k].clear()
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.predict_batch(images[:batch])
            torch.cuda.synchronize()
            totals.append(time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.remove()
    out = {k: statistics.median(v) for k, v in seconds.items()}
    out["total (predict_batch)"] = statistics.median(totals)
    out["rest (transform, pasting, copies)"] = out["total (predict_batch)"] - sum(
        out[k] for k in parts)
    return out


def print_syncs(engine, images) -> None:
    """Host syncs of one ``predict_batch`` (CUDA sync debug mode warns at each), by source line."""
    import collections
    import traceback
    import warnings

    where: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "napari_sartorius" in f.filename]
            site = frames[-1] if frames else None
            where[f"{site.filename.split('napari_sartorius/')[-1]}:{site.lineno} {site.name}" if site else "other"] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.predict_batch(images)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    print(f"host syncs in one predict_batch of {len(images)} images: {sum(where.values())}", flush=True)
    for site, n in where.most_common(20):
        print(f"  {n:5d}  {site}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--test-size", type=int, default=1024)
    args = ap.parse_args()
    import sys
    sys.path.insert(0, "benchmarks")
    from bench_gpu import make_engine, make_images

    images = make_images(args.batch)
    print(f"per batch of {args.batch} images, test size {args.test_size}, median of 5, seconds", flush=True)
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for detections in (1000, 100):
            for amp in (False, True):
                engine = make_engine("cuda", args.test_size, 0, amp, detections)
                t = stage_times(engine, images, args.batch)
                line = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items())
                print(f"cudnn.benchmark {benchmark}, {detections} det, {'fp16' if amp else 'fp32'}: {line} -> "
                      f"{args.batch / t['total (predict_batch)']:.1f} img/s", flush=True)
                del engine
                torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    engine = make_engine("cuda", args.test_size, 0, True, 1000)
    engine.predict_batch(images[: args.batch])
    try:
        print_syncs(engine, images[: args.batch])
    except Exception as exc:  # never run before on a GPU: the profile below must still come
        print(f"sync count failed: {type(exc).__name__}: {exc}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            engine.predict_batch(images[: args.batch])
        torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"))
    print(f"CUDA kernel launches per predict_batch: {launches / 2:.0f}", flush=True)
    print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
