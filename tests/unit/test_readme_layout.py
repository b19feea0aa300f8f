"""The README's layout tables match the tree: every package and top-level module of `tulu/` is
named exactly once, in the layer `tests/unit/test_layering.py` gives it, and every named file or
folder exists; every top-level folder of the repository is listed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.unit.test_layering import LAYERS

REPO = Path(__file__).resolve().parents[2]


def _section(name: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {name}\n")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def _tulu_rows() -> list[tuple[str, list[str], list[str]]]:
    """(layer, the units named in the package column, the files named in the description)."""
    rows, layer = [], None
    for line in _section("Layout").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "folder") or cells[0].startswith("-"):
            continue
        layer = cells[0] or layer
        rows.append((layer, re.findall(r"`([^`]+)`", cells[1]),
                     re.findall(r"`([a-z_/]+\.py)`", cells[2])))
    return rows


def test_every_tulu_unit_is_in_the_readme_once_in_its_layer():
    named: dict[str, str] = {}
    for layer, items, _ in _tulu_rows():
        for item in items:
            unit = "tulu." + item.removesuffix("/").removesuffix(".py")
            assert unit not in named, f"{item} named twice"
            named[unit] = layer
    units = {u: name for name, us in LAYERS for u in us if u != "tulu"}
    assert named == units


def test_every_file_the_tulu_table_names_exists_in_its_package():
    for _, items, files in _tulu_rows():
        packages = [REPO / "tulu" / i for i in items if i.endswith("/")]
        for item in items:
            assert (REPO / "tulu" / item).exists(), item
        for f in files:
            assert any((pkg / f).exists() for pkg in packages), (items, f)


def test_every_top_level_folder_is_listed():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = {line.split("/")[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    listed = {m.rstrip("/").split("/")[0] for m in re.findall(r"^\| `([^`]+)`", _section("Layout"), re.M)}
    assert folders <= listed, sorted(folders - listed)
