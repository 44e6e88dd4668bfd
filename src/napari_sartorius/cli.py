"""Command line: ``napari-sartorius demo | segment | evaluate | convert | models | init-model |
import-detectron2 | train``.

Why over 500 lines: the parser and the thin command functions; argument checks live in
``cli_checks``, the larger commands in ``commands/``, the work itself in the core.

The names, options and outputs here are a contract other tools call. Errors end with a one-line
reason on stderr and a non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_checks import CLIError, check_label_predictions, check_model_files, output_folder, unit_interval
from .commands.pretrained import resolve_model_arg
from .device import DEVICE_CHOICES
from .inference.settings import FUSION_METHODS, TTA_MODES

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

DEFAULT_ARCH = "mask_rcnn_R_50_FPN"

#: Exit statuses: 1 for a failed job, 2 for bad usage or bad input (argparse uses 2 as well).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


# -- helpers -----------------------------------------------------------------------------------


def _progress(message: str, step: int | None = None, total: int | None = None) -> None:
    """One progress line on stderr (stdout stays clean for ``--json`` and pipes)."""
    prefix = f"[{step}/{total}] " if step is not None and total else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Image files named directly or found (not recursively) in the folders given, sorted by name."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise CLIError(f"no such file or folder: {p}")
    stems = [f.stem for f in found]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise CLIError(f"several images share the name {dupes[0]!r}; outputs are named by stem, so segment them separately")
    return found


def build_engines(models: Sequence[str], device: str, cell_type: str | None):
    """Engines for ``--model`` values: ``classical`` or checkpoint paths."""
    models = [resolve_model_arg(m) for m in models or ["classical"]]  # registry names -> cached files
    check_model_files(models)  # a text file or a pickle: one line before any torch import
    engines = []
    for m in models:
        if m == "classical":
            from .classical import ClassicalEngine, ClassicalSettings

            engines.append(ClassicalEngine(ClassicalSettings(cell_type=cell_type)))
            continue
        path = Path(m)
        if not path.is_file():
            raise CLIError(f"--model {m}: no such checkpoint file or pretrained name (see `napari-sartorius "
                           "pretrained list`; or use --model classical)")
        from .models.predictor import MaskRCNNEngine

        from .models.model_files import resolve_model_file

        engines.append(MaskRCNNEngine.from_checkpoint(resolve_model_file(path), device=device))
    return engines


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CLIError(f"--weights {text!r}: give comma-separated numbers, one per --model") from None
    if len(weights) != n:
        raise CLIError(f"--weights has {len(weights)} values for {n} models")
    return weights


def _segment_files(images: list[Path], engines, args):
    """Segment each image; returns an AnnotationSet of predictions (raw or post-processed)."""
    from .annotations import AnnotationSet, ImageAnnotations
    from .inference.segment import run_to_completion, segment_image
    from .io.images import read_image
    from .io.label_images import write_label_image
    from .postprocess import PostprocessSettings, postprocess

    class_names = tuple(engines[0].class_names)
    settings = PostprocessSettings(class_names=class_names, cell_type=args.cell_type)
    weights = _parse_weights(getattr(args, "weights", None), len(engines))
    out = AnnotationSet(class_names=class_names)
    for k, path in enumerate(images, 1):
        t0 = time.perf_counter()
        image = read_image(path)
        raw = run_to_completion(
            segment_image(
                image,
                engines,
                weights=weights,
                tta=args.tta,
                ensemble=args.ensemble,
                iou_thr=args.iou,
            )
        )
        if args.raw:
            inst = raw
        else:
            res = postprocess(raw, settings)
            inst = res.to_instances()
            write_label_image(res.labels, Path(args.out) / f"{path.stem}_labels.tif")
        cell_type = _majority_type(inst, class_names) if args.cell_type is None else args.cell_type
        out.images.append(ImageAnnotations(path.stem, inst, cell_type=cell_type, file_name=path.name))
        _progress(f"{path.name}: {len(inst)} cells in {time.perf_counter() - t0:.1f} s", k, len(images))
        del image
    return out


def _majority_type(inst, class_names):
    from .postprocess import majority_class

    k = majority_class(inst, len(class_names))
    return None if k is None else class_names[k]


def _write_predictions(aset, out_dir: Path) -> Path:
    from .io import save_annotations

    path = out_dir / "predictions.json"
    save_annotations(aset, path, "results")
    return path


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from .annotations import AnnotationSet
    from .io.label_images import write_label_image
    from .metrics import evaluate
    from .synthetic import make_sample

    out = output_folder(args.out)
    sample = make_sample(args.style, seed=args.seed)
    image_path = out / "image.png"
    from PIL import Image

    from .io.atomic import atomic_path

    with atomic_path(image_path) as tmp:
        Image.fromarray(sample.image).save(tmp, format="PNG")
    _progress(f"synthetic {args.style} sample (seed {args.seed}): {sample.image.shape[0]}x{sample.image.shape[1]} px, "
              f"{int(sample.labels.max())} cells -> {image_path}")
    engines = build_engines(["classical"], "cpu", None)
    preds = _segment_files([image_path], engines, _DemoArgs(out))
    (out / "image_labels.tif").replace(out / "labels.tif")
    pred_path = _write_predictions(preds, out)
    truth = AnnotationSet([sample.to_annotations("image")], class_names=preds.class_names)
    truth.images[0].file_name = image_path.name
    write_label_image(sample.labels, out / "truth_labels.tif")
    result = evaluate(preds, truth)
    print(f"wrote {out / 'labels.tif'}, {pred_path}")
    print(f"competition score vs. ground truth: {result.score:.3f} "
          f"(COCO mask AP {result.coco_ap['AP']:.3f}, AP50 {result.coco_ap['AP50']:.3f})")
    return 0


class _DemoArgs:
    """The segment options the demo uses: one classical model, no TTA, cleaned labels."""

    def __init__(self, out: Path):
        self.out, self.tta, self.ensemble, self.iou = out, "none", "wbf", 0.5
        self.cell_type, self.raw, self.weights = None, False, None


def cmd_segment(args) -> int:
    """Folder inference (:mod:`.inference.folder_run`): streamed, resumable, sharded by rank under torchrun."""
    from .cell_types import check_cell_type
    from .inference.folder_run import PREDICTIONS, FolderSettings, SoloGroup, TorchGroup, segment_folder
    from .training import distributed

    args.cell_type = check_cell_type(args.cell_type)
    for opt in ("batch", "workers"):
        value = getattr(args, opt, None)
        if value is not None and value < (1 if opt == "batch" else 0):
            raise CLIError(f"--{opt} {value}: give at least {1 if opt == 'batch' else 0}")
    images = collect_images(args.inputs)
    out = output_folder(args.out)
    ctx = distributed.init_from_env(args.device)  # None unless launched by torchrun with several ranks
    try:
        device = str(ctx.device) if ctx is not None else _resolve_device_name(args.device)
        group = TorchGroup(ctx.device) if ctx is not None else SoloGroup()
        say = _progress if group.rank == 0 else (lambda line: print(line, file=sys.stderr, flush=True))
        weights = _parse_weights(getattr(args, "weights", None), len(args.model or ["classical"]))
        engines = build_engines(args.model, device, args.cell_type)
        workers = args.workers if args.workers is not None else (2 if device.startswith("cuda") else 0)
        if group.rank == 0:
            ranks = f", {group.world} ranks" if group.world > 1 else ""
            say(f"{len(images)} image(s), {len(engines)} model(s) [{', '.join(e.name for e in engines)}], "
                f"TTA {args.tta}, ensemble {args.ensemble}, device {device}{ranks}")
        settings = FolderSettings(tta=args.tta, ensemble=args.ensemble, iou=args.iou,
                                  weights=None if weights is None else tuple(weights),
                                  cell_type=args.cell_type, raw=args.raw,
                                  batch=args.batch if args.batch is not None else (4 if device.startswith("cuda") else 1))
        result = segment_folder(images, engines, out, settings, group=group, resume=args.resume,
                                workers=workers, say=say)
    finally:
        distributed.cleanup()
    if group.rank != 0:  # exit 0: a failing rank would make torchrun stop rank 0 in its merge
        return 0  # (rank 0 lists every rank's failures and sets the exit status)
    what = "raw predictions" if args.raw else "label images and predictions"
    print(f"wrote {what} for {result.merged_images} image(s), {result.merged_cells} cells, to {out} ({PREDICTIONS})")
    if result.failures_total:
        _progress(f"{result.failures_total} image(s) could not be segmented, listed in {out / 'failures.txt'}; "
                  "fix or remove them and run again with --resume")
        return EXIT_FAILED
    return 0


def _resolve_device_name(name: str) -> str:
    from .device import resolve_device

    return str(resolve_device(name))


def cmd_evaluate(args) -> int:
    from .io import detect_format, load_annotations
    from .metrics import evaluate

    gt = load_annotations(args.gt)
    pred = load_annotations(args.pred, class_names=gt.class_names)
    if detect_format(Path(args.pred)) == "labels":
        check_label_predictions(pred, args.pred)
    result = evaluate(pred, gt)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.format())
    return 0


def cmd_convert(args) -> int:
    from .io import load_annotations, save_annotations

    fmt = {"coco": "coco", "csv": "csv", "labels": "labels"}[args.to]
    aset = load_annotations(args.src, images_dir=args.images)
    if len(aset) == 0:
        raise CLIError(f"{args.src}: no images in this annotation set, nothing to convert")
    save_annotations(aset, Path(args.out), fmt)
    n = sum(len(im.instances) for im in aset)
    print(f"converted {len(aset)} image(s), {n} instances, to {args.to}: {args.out}")
    return 0


def cmd_models(args) -> int:
    from .models.registry import REGISTRY  # torch-free: the counts are stored, nothing is built

    width = max(len(n) for n in REGISTRY)
    print(f"{'architecture'.ljust(width)}  parameters  description")
    for name, info in REGISTRY.items():
        print(f"{name.ljust(width)}  {info.parameters / 1e6:8.1f} M  {info.description}")
    return 0


def cmd_init_model(args) -> int:
    from .models.checkpoint import init_checkpoint

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    if not classes:
        raise CLIError("--classes: give at least one class name")
    imagenet = resolve_model_arg(args.imagenet, kinds=("imagenet",))
    path = init_checkpoint(args.arch, Path(args.out), class_names=classes, imagenet_weights=imagenet)
    print(f"wrote {path} ({args.arch}, classes {', '.join(classes)})")
    return 0


def cmd_import_detectron2(args) -> int:
    from .models.detectron2_import import import_detectron2

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    path = import_detectron2(Path(args.weights), Path(args.config), Path(args.out), class_names=classes)
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .models.config import ModelConfig, check_arch
    from .training import TrainSettings, concat_datasets, dataset_from_file, distributed

    if args.arch is not None:
        check_arch(args.arch)
    if args.iters < 1:
        raise CLIError("--iters must be at least 1")
    if args.size is not None and args.size < 32:
        raise CLIError("--size must be at least 32 px")
    if args.folds is not None and args.val:
        raise CLIError("--folds and --val exclude each other: K-fold takes its validation images from --data")
    args.base = resolve_model_arg(args.base)
    if args.base:
        check_model_files([args.base], "--base")
        from .models.checkpoint import read_checkpoint

        base_arch = read_checkpoint(args.base)[1].arch
        if args.arch is not None and args.arch != base_arch:
            raise CLIError(f"--arch {args.arch} but --base {args.base} holds a {base_arch}; drop --arch or pick "
                           "a checkpoint of that architecture")
        args.arch = base_arch
    args.arch = args.arch or DEFAULT_ARCH
    data = concat_datasets([dataset_from_file(src, args.images, clean=args.clean_masks) for src in args.data])
    val = dataset_from_file(args.val, args.images, clean=args.clean_masks) if args.val else None
    sizes = {}
    if args.size is not None:
        from .training.settings import multiscale_sizes

        sizes = {"min_size_train": multiscale_sizes(args.size, (0.8, 1.0, 1.2)), "max_size_train": 2 * args.size}
    settings = TrainSettings(
        iters=args.iters, lr=args.lr, batch_size=args.batch, device=args.device, out=str(args.out),
        resume=args.resume,
        eval_period=max(1, args.iters // 5) if (val is not None or args.folds) else 0,
        **sizes,
    )
    if args.base:
        start = args.base
    else:
        test_size = {} if args.size is None else {"min_size_test": args.size, "max_size_test": 2 * args.size}
        start = ModelConfig(args.arch, class_names=data.class_names, **test_size)
    main_process = distributed.is_main_process()  # under torchrun only rank 0 talks
    say = _progress if main_process else (lambda *a, **k: None)
    try:
        return _train(args, start, data, val, settings, say, main_process)
    finally:
        distributed.cleanup()


def _train(args, start, data, val, settings, say, main_process) -> int:
    from .training import run_kfold, train

    n_cells = sum(s.n_cells for s in data.samples)
    say(f"training {args.arch} from {args.base or 'a fresh model'} on {len(data.samples)} image(s), "
        f"{n_cells} cells, {args.iters} iterations, batch {args.batch}, lr {args.lr}")
    if args.folds is not None:
        result = _drain(run_kfold(start, data, args.folds, settings), _kfold_line, say)
        if main_process:
            print(result.format())
        return 0 if not result.cancelled else EXIT_FAILED
    result = _drain(train(start, data, settings, val_data=val), _train_line, say)
    where = result.best_path if result.best_path else result.checkpoint_path
    score = f", best validation score {result.best_score:.4f}" if result.best_score is not None else ""
    if main_process:
        print(f"wrote {where} after {result.iterations} iterations{score}")
    return 0


def _drain(gen, describe, say):
    """Run a job generator to its end (:func:`~napari_sartorius.jobs.run_job`), saying the lines
    ``describe`` gives (it returns None for the updates not worth a line)."""
    from .jobs import run_job

    def relay_line(item) -> None:
        line = describe(item)
        if line:
            say(line)

    return run_job(gen, relay_line)


def _train_line(p) -> str | None:
    if p.message:
        return p.message
    if p.iteration % 20 and p.iteration != p.total and p.val_score is None:
        return None
    loss = p.losses.get("total", float("nan"))
    left = f", {p.seconds_left / 60:.1f} min left" if p.seconds_left else ""
    val = f", validation {p.val_score:.4f}" if p.val_score is not None else ""
    return f"iter {p.iteration}/{p.total} loss {loss:.3f} lr {p.lr:.2e}{val}{left}"


def _kfold_line(p) -> str | None:
    line = _train_line(p.progress)
    return None if line is None else f"fold {p.fold}/{p.folds}: {line}"


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="napari-sartorius",
        description="Segment neuronal cells in phase-contrast images with Mask R-CNN ensembles "
        "(or the weight-free classical engine), evaluate, convert and train.",
    )
    p.add_argument("--version", action="version", version=f"napari-sartorius {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="segment a built-in synthetic sample and score it against its truth")
    d.add_argument("--out", required=True, help="output folder (created)")
    d.add_argument("--style", default="cort", choices=("shsy5y", "astro", "cort"), help="sample style (default cort)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the sample (default 0)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("segment", help="segment images into label images and COCO results")
    s.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    s.add_argument("--out", required=True,
                   help="output folder: <stem>_labels.tif, predictions.json and summary.csv (cells, uncertainty, expected wrong cells)")
    s.add_argument("--model", action="append", metavar="CKPT",
                   help="checkpoint file, pretrained name (`pretrained list`), or 'classical' for the weight-free engine; "
                   "repeat for an ensemble "
                   "(default: classical)")
    s.add_argument("--weights", help="comma-separated ensemble weight per --model (default: equal)")
    s.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation (default none)")
    s.add_argument("--ensemble", default="wbf", choices=FUSION_METHODS,
                   help="how models and TTA variants are fused (default wbf)")
    s.add_argument("--iou", type=unit_interval, default=0.5, help="IoU threshold of the fusion, in (0, 1] (default 0.5)")
    s.add_argument("--cell-type", default="auto", help="auto (majority predicted class) or shsy5y, astro, cort")
    s.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="default auto")
    s.add_argument("--raw", action="store_true",
                   help="write every instance above the model's score threshold with its score, overlaps kept, "
                   "no post-processing (for COCO-style evaluation); no label images")
    s.add_argument("--resume", action="store_true",
                   help="skip the images an earlier (stopped) run into --out finished")
    s.add_argument("--batch", type=int, metavar="N",
                   help="images per network pass for one model without TTA (default 4 on a GPU, 1 on the CPU)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="processes decoding images ahead of the models, and as many post-processing their results "
                   "behind them (default 2 on a GPU, 0 on the CPU)")
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="competition score (overall, per cell type) and COCO mask AP")
    e.add_argument("--pred", required=True, help="predictions: COCO JSON, Kaggle CSV or folder of label images")
    e.add_argument("--gt", required=True, help="ground truth: COCO JSON, Kaggle CSV or folder of label images")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object: score, per_class, coco_ap, n_images, notes")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("convert", help="convert annotations between COCO JSON, Kaggle CSV and label images")
    c.add_argument("src", help="COCO JSON, Kaggle CSV, or a folder of label images")
    c.add_argument("--to", required=True, choices=("coco", "csv", "labels"))
    c.add_argument("--out", required=True, help="output file (coco, csv) or folder (labels)")
    c.add_argument("--images", action="append", metavar="DIR",
                   help="folder of the images (for sizes and file names when SRC lacks them); repeatable")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("models", help="list the Mask R-CNN architectures with their parameter counts")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("init-model", help="write a fresh (random or ImageNet-initialised) checkpoint")
    i.add_argument("arch", help="architecture (see `napari-sartorius models`)")
    i.add_argument("--out", required=True, help="checkpoint file to write")
    i.add_argument("--classes", default="shsy5y,astro,cort", help="comma-separated class names")
    i.add_argument("--imagenet", metavar="WEIGHTS", help="ImageNet backbone weights: a file, or a pretrained name such as imagenet-r50")
    i.set_defaults(func=cmd_init_model)

    x = sub.add_parser("import-detectron2", help="turn a detectron2 checkpoint (.pth/.pkl) into this project's format")
    x.add_argument("weights", help="detectron2 checkpoint (.pth) or model-zoo weights (.pkl)")
    x.add_argument("--config", required=True, help="the config.yaml it was trained with")
    x.add_argument("--out", required=True, help="checkpoint file to write")
    x.add_argument("--classes", default="shsy5y,astro,cort", help="comma-separated class names, in training order")
    x.set_defaults(func=cmd_import_detectron2)

    from .commands import import_mmdet

    import_mmdet.add_parser(sub)

    t = sub.add_parser("train", help="train or fine-tune a model (K-fold cross-validation with --folds)")
    t.add_argument("--data", action="append", required=True, metavar="SRC", help="COCO JSON or Kaggle CSV (repeatable)")
    t.add_argument("--images", action="append", metavar="DIR",
                   help="folder of the training images, repeatable (default: beside SRC or its images/ folder)")
    t.add_argument("--arch", help=f"architecture (default: that of --base, else {DEFAULT_ARCH})")
    t.add_argument("--base", help="starting checkpoint, or a pretrained name such as livecell-shsy5y (`pretrained list`)")
    t.add_argument("--iters", type=int, default=1000, help="iterations (default 1000)")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--val", help="validation annotations (COCO JSON or Kaggle CSV)")
    t.add_argument("--folds", type=int, help="K-fold cross-validation, stratified by cell type")
    t.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    t.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    t.add_argument("--lr", type=float, default=0.01, help="base learning rate (default 0.01)")
    t.add_argument("--size", type=int,
                   help="short image side in px: training at 0.8/1/1.2 x SIZE, and a fresh model's test size "
                   "(default: the architecture's, 640-1024 training, 1024 test)")
    t.add_argument("--clean-masks", action="store_true", help="fill holes, drop fragments and resolve overlaps first")
    t.add_argument("--resume", action="store_true", help="continue from --out if it holds a stopped run")
    t.set_defaults(func=cmd_train)

    from .commands import pretrained as pretrained_command

    pretrained_command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-sartorius: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        bad_input = isinstance(exc, (CLIError, ValueError, FileNotFoundError, IsADirectoryError, KeyError))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"napari-sartorius {args.command}: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
