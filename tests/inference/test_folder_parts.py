"""merge_parts (each line decoded once) against the merge it replaced (every line decoded twice):
the same predictions.json, summary.csv, failures.txt, return value or error, whatever the parts hold."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_sartorius.inference import folder_parts as fp
from napari_sartorius.inference.folder_parts import FolderRunError, merge_parts


def reference_merge(images, out):
    """merge_parts before issue 11's single decoding (verbatim but for names)."""
    from napari_sartorius.inference.uncertainty import image_summary, write_summary_csv
    from napari_sartorius.io.atomic import atomic_write

    out = Path(out)
    index = {}
    for part in fp._part_files(out, "rank"):
        for offset, n, rec in fp._complete_lines(part):
            index.setdefault(rec["file"], (part, offset, n))
    failed = {}
    for part in fp._part_files(out, "failures.rank"):
        for _, _, rec in fp._complete_lines(part):
            if rec["file"] not in index:
                failed[rec["file"]] = str(rec.get("error", ""))
    missing = [p.name for p in images if p.name not in index and p.name not in failed]
    if missing:
        raise FolderRunError(
            f"{len(missing)} image(s) have no results yet (first: {missing[0]}); a rank stopped early: run the "
            "same command again with --resume"
        )
    path = out / fp.PREDICTIONS
    n_planes = n_cells = 0
    summary = []
    with atomic_write(path, "w") as fh:
        fh.write("[")
        sep = ""
        for p in images:
            if p.name not in index:
                continue
            part, offset, n = index[p.name]
            with open(part, "rb") as src:
                src.seek(offset)
                rec = json.loads(src.read(n))
            for plane in rec["planes"]:
                n_planes += 1
                unc = []
                for r in plane["results"]:
                    r = dict(r, image_id=n_planes, file_name=plane["name"])
                    fh.write(sep + json.dumps(r, separators=(",", ":")))
                    sep = ",\n"
                    n_cells += 1
                    if r.get("uncertainty") is not None:
                        unc.append(float(r["uncertainty"]))
                defined = bool(unc) and len(unc) == len(plane["results"])
                summary.append(image_summary(plane["name"], np.asarray(unc) if defined else None,
                                             count=len(plane["results"]),
                                             scores=np.array([r["score"] for r in plane["results"]]),
                                             areas=np.array([r["area"] for r in plane["results"]])))
        fh.write("]\n")
    write_summary_csv(summary, out / fp.SUMMARY)
    fail_path = out / fp.FAILURES
    if failed:
        with atomic_write(fail_path, "w") as fh:
            for p in images:
                if p.name in failed:
                    fh.write(f"{p.name}: {failed[p.name]}\n")
    else:
        fail_path.unlink(missing_ok=True)
    return n_planes, n_cells, len(failed), path


def _record(name, n_results, seed, planes=1, uncertainty=True):
    rng = np.random.default_rng(seed)
    out = []
    for z in range(planes):
        results = []
        for _ in range(n_results):
            r = {"category_id": int(rng.integers(1, 4)),
                 "segmentation": {"size": [52, 70], "counts": "PQ" + str(int(rng.integers(0, 999)))},
                 "area": int(rng.integers(1, 500)), "bbox": [1.0, 2.0, 3.0, 4.0], "score": float(rng.random())}
            if uncertainty:
                r["uncertainty"] = round(float(rng.random()), 6)
            results.append(r)
        out.append({"name": name if planes == 1 else f"{name}[{z}]", "size": [52, 70], "cell_type": "shsy5y",
                    "results": results})
    return {"file": name, "planes": out}


def _write_parts(out: Path, lines: dict[str, list[bytes]]) -> None:
    (out / fp.PARTS_DIR).mkdir(parents=True, exist_ok=True)
    for fname, ls in lines.items():
        (out / fp.PARTS_DIR / fname).write_bytes(b"".join(ls))


def _outcome(merge, images, out: Path):
    try:
        ret = merge(images, out)
    except FolderRunError as e:
        return ("error", str(e))
    files = {n: (out / n).read_bytes() if (out / n).exists() else None
             for n in (fp.PREDICTIONS, fp.SUMMARY, fp.FAILURES)}
    return (ret[:3], files)


NAMES = ["a.png", 'q"uo,te.png', "back\\slash.png", "ünï.tif", 'x",y.png', "plain.png"]


def _case(tmp_path: Path, lines: dict, images):
    """The outcome of both merges on a copy each of the same parts."""
    outs = []
    for k, merge in enumerate((reference_merge, merge_parts)):
        out = tmp_path / f"run{k}"
        _write_parts(out, lines)
        outs.append(_outcome(merge, [Path(n) for n in images], out))
    assert outs[0] == outs[1]
    return outs[1]


def test_plain_parts_of_two_ranks_merge_identically(tmp_path):
    lines = {"rank0.jsonl": [fp._line(_record(n, 5, k)) for k, n in enumerate(NAMES[0::2])],
             "rank1.jsonl": [fp._line(_record(n, 3, k + 10, planes=2)) for k, n in enumerate(NAMES[1::2])]}
    (ret, files) = _case(tmp_path, lines, NAMES)
    assert ret == (9, 5 * 3 + 3 * 2 * 3, 0)
    assert len(json.loads(files[fp.PREDICTIONS])) == 33


def test_duplicates_partial_and_corrupt_lines_and_failures(tmp_path):
    corrupt = fp._line(_record("a.png", 2, 1))[:-30] + b"\n"  # newline-terminated, not valid JSON
    lines = {
        "rank0.jsonl": [corrupt, fp._line(_record("a.png", 4, 2)), fp._line(_record("a.png", 6, 3)),
                        fp._line(_record("plain.png", 2, 4))[:-9]],  # a kill: no newline
        "rank1.jsonl": [fp._line(_record("plain.png", 3, 5)), fp._line(_record(NAMES[1], 1, 6, uncertainty=False))],
        "failures.rank0.jsonl": [fp._line({"file": "b.png", "error": "unreadable"})],
    }
    (ret, files) = _case(tmp_path, lines, ["a.png", "b.png", "plain.png", NAMES[1]])
    assert ret == (3, 4 + 3 + 1, 1)
    assert files[fp.FAILURES] == b"b.png: unreadable\n"


def test_a_file_with_only_a_corrupt_line_and_a_failure_counts_as_failed(tmp_path):
    corrupt = fp._line(_record("a.png", 2, 1))[:-30] + b"\n"
    lines = {"rank0.jsonl": [corrupt, fp._line(_record("plain.png", 2, 2))],
             "failures.rank0.jsonl": [fp._line({"file": "a.png", "error": "boom"})]}
    (ret, files) = _case(tmp_path, lines, ["a.png", "plain.png"])
    assert ret == (1, 2, 1)


@pytest.mark.parametrize("images", [["a.png", "plain.png", "c.png"], ["c.png", "plain.png"]])
def test_missing_files_give_the_same_error(tmp_path, images):
    corrupt = fp._line(_record("a.png", 2, 1))[:-30] + b"\n"
    lines = {"rank0.jsonl": [corrupt, fp._line(_record("plain.png", 2, 2))]}
    kind, msg = _case(tmp_path, lines, images)
    assert kind == "error" and "--resume" in msg


def test_lines_not_starting_with_the_file_key_and_files_outside_the_list(tmp_path):
    rec = _record("a.png", 2, 1)
    reordered = (json.dumps({"planes": rec["planes"], "file": "a.png"}) + "\n").encode()
    outside_corrupt = fp._line(_record("zzz.png", 2, 3))[:-30] + b"\n"
    lines = {"rank0.jsonl": [reordered, outside_corrupt, fp._line(_record("plain.png", 2, 2))],
             "failures.rank0.jsonl": [fp._line({"file": "zzz.png", "error": "x"})]}
    (ret, files) = _case(tmp_path, lines, ["a.png", "plain.png"])
    assert ret == (2, 4, 1)


def test_valid_parts_are_decoded_once(tmp_path, monkeypatch):
    # (a name holding '",' is read by decoding its whole line once more: correct, only slower)
    names = [n for n in NAMES if '",' not in n]
    lines = {"rank0.jsonl": [fp._line(_record(n, 3, k)) for k, n in enumerate(names)]}
    _write_parts(tmp_path, lines)
    decoded = []
    real_loads = json.loads
    monkeypatch.setattr(fp.json, "loads", lambda s, *a, **k: decoded.append(len(s)) or real_loads(s, *a, **k))
    monkeypatch.setattr(fp, "_complete_lines", lambda path: pytest.fail("a validating pass over the parts"))
    assert merge_parts([Path(n) for n in names], tmp_path)[:3] == (5, 15, 0)
    big = [n for n in decoded if n > 200]  # the lines (names are decoded from their short prefix)
    assert len(big) == len(names)
