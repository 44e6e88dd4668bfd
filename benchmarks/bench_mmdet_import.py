"""Time and memory of importing an MMDetection checkpoint (``import_mmdet``), without MMDetection.

Writes a synthetic MMDetection 3.x checkpoint of the asked model-zoo config (random weights under
MMDetection's names and layout, 80 COCO classes as the model zoo's, the config text and class names in
``meta``, as mmengine saves them), then imports it ``--runs`` times into a project checkpoint and
prints the median wall and CPU time and the process's peak resident memory.

    python benchmarks/bench_mmdet_import.py [--config mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py] [--runs 3]
    python benchmarks/bench_mmdet_import.py --config cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from napari_sartorius.models.architectures import build_model
from napari_sartorius.models.mmdet_config import load_mmdet_config, mmdet_to_model_config
from napari_sartorius.models.mmdet_import import import_mmdet

_NAMES = [  # project name -> MMDetection name
    # cascade stages first (their names hold the stage index)
    (r"^roi_heads\.box_head\.(\d)\.fc6\.", r"roi_head.bbox_head.\1.shared_fcs.0."),
    (r"^roi_heads\.box_head\.(\d)\.fc7\.", r"roi_head.bbox_head.\1.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.(\d)\.cls_score\.", r"roi_head.bbox_head.\1.fc_cls."),
    (r"^roi_heads\.box_predictor\.(\d)\.bbox_pred\.", r"roi_head.bbox_head.\1.fc_reg."),
    (r"^roi_heads\.mask_head\.(\d)\.(\d)\.0\.", r"roi_head.mask_head.\1.convs.\2.conv."),
    (r"^roi_heads\.mask_predictor\.(\d)\.conv5_mask\.", r"roi_head.mask_head.\1.upsample."),
    (r"^roi_heads\.mask_predictor\.(\d)\.mask_fcn_logits\.", r"roi_head.mask_head.\1.conv_logits."),
    (r"^backbone\.body\.(layer\d\.\d+\.conv2)\.offset\.", r"backbone.\1.conv_offset."),
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
    (r"^roi_heads\.mask_head\.(\d)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
]


def write_checkpoint(config_name: str, path: Path) -> int:
    """A synthetic MMDetection checkpoint of ``config_name`` at ``path``; returns its size in bytes."""
    cfg = load_mmdet_config(config_name)
    head = cfg["model"]["roi_head"]["bbox_head"]
    k = (head[-1] if isinstance(head, list) else head)["num_classes"]
    classes = tuple(f"class{i}" for i in range(k))
    config, _ = mmdet_to_model_config(cfg, classes)
    state = {}
    for key, v in build_model(config).state_dict().items():
        name = next(re.sub(p, r, key) for p, r in _NAMES if re.match(p, key))
        if ".fc_cls." in name:
            v = torch.cat([v[1:], v[:1]])
        elif ".fc_reg." in name and len(v) > 4:  # class-specific: no background block (cascade: 4 rows)
            v = v[4:]
        elif ".conv_logits." in name:
            v = v[1:]
        state[name] = v
    text = "\n".join(f"{key} = {value!r}" for key, value in cfg.items())
    torch.save({"meta": {"cfg": text, "dataset_meta": {"classes": classes}}, "state_dict": state}, path)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", help="a bundled model-zoo config")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "epoch_12.pth"
        size = write_checkpoint(args.config, src)
        walls, cpus = [], []
        for i in range(args.runs):
            w0, c0 = time.perf_counter(), time.process_time()
            import_mmdet(src, Path(tmp) / f"imported{i}.pt")
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.config}: checkpoint {size / 1e6:.0f} MB, import median {statistics.median(walls):.2f} s wall, "
        f"{statistics.median(cpus):.2f} s CPU ({args.runs} runs), peak RSS of the process {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
