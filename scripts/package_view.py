"""Assemble the package as one directory tree: riskbridge/ with connectors/, harmonize/ and model/ inside it.

In the repository those three live beside riskbridge/ and pyproject.toml's package-dir maps them into the package;
tools that read one package from one directory (import-linter, mypy across the subpackages) need the installed
shape. Copies the .py files (and py.typed) into ``DEST/riskbridge``, and those of any other top-level folders named
(tests, dags, bench) beside it; usage: ``python scripts/package_view.py DEST [FOLDER ...]``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("connectors", "harmonize", "model")


def copy_sources(source: Path, dest: Path) -> None:
    """Copy every .py file (and py.typed) under ``source`` to the same place under ``dest``."""
    for path in source.rglob("*"):
        if path.suffix == ".py" or path.name == "py.typed":
            if "__pycache__" in path.parts:
                continue
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def main(dest: Path, folders: list[str]) -> None:
    """Build the view under ``dest``, with the named top-level ``folders`` copied beside the package."""
    package = dest / "riskbridge"
    copy_sources(ROOT / "riskbridge", package)
    for name in SUBPACKAGES:
        copy_sources(ROOT / name, package / name)
    for name in folders:
        copy_sources(ROOT / name, dest / name)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: package_view.py DEST [FOLDER ...]")
    main(Path(sys.argv[1]), sys.argv[2:])
