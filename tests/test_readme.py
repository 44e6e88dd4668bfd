"""README's commands stay true: CI runs exactly its test command; what it says about the CLI holds."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"Set up and run the whole test suite.*?```sh\n(.+?)\n```", text, re.S)
    assert m, "README lost its test command block"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert commands == [_readme_test_command()]


def test_readme_cli_defaults_match_the_parser():
    from napari_sartorius.cli import build_parser
    from napari_sartorius.device import DEVICE_CHOICES

    text = (REPO / "README.md").read_text()
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    iters = next(a for a in train._actions if a.dest == "iters")
    assert not iters.required and f"`--iters {iters.default}`" in text
    assert "--iters N \\" not in text  # never shown as required
    assert f"--device {'|'.join(DEVICE_CHOICES)}" in text
    assert "demo-out/" in (REPO / ".gitignore").read_text().split()
