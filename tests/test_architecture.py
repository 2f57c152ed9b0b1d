"""ARCHITECTURE.md stays true: every file it names exists, and every module of the three library rooms is named."""
from __future__ import annotations

import re

from conftest import ROOT


def test_every_path_architecture_md_names_exists_and_every_module_is_named():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:models|objectives|datamodules|lab|configs|tests)/[\w./-]+\.(?:py|yaml))`", text))
    assert named, "ARCHITECTURE.md names no files"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for room in ("models", "objectives", "datamodules", "lab")
               for p in (ROOT / room).rglob("*.py") if p.name != "__init__.py"}
    assert not modules - named, f"modules ARCHITECTURE.md does not place: {sorted(modules - named)}"
