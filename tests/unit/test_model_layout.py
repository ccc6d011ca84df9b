"""The model package's shape (issue 13): its exceptions sit on riskbridge.errors' branches, its public API is
importable lazily from ``riskbridge.model`` without torch, it never imports the synthetic-data generator, and the
volume builder in harmonize does no file I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import riskbridge.model
from riskbridge.errors import DataError, ModelError, RiskbridgeError
from riskbridge.harmonize.volume import VolumeError
from riskbridge.model.data import TrainingTableError
from riskbridge.model.package import ModelPackageError
from riskbridge.model.scoring import ScoringError
from riskbridge.model.seg import SegmentationError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("error", "branch", "standard"),
    [
        (ModelPackageError, ModelError, ValueError),
        (ScoringError, ModelError, RuntimeError),
        (TrainingTableError, DataError, ValueError),
        (SegmentationError, DataError, ValueError),
        (VolumeError, DataError, Exception),
    ],
)
def test_each_model_and_volume_error_is_a_riskbridge_error_of_its_branch(
    error: type[Exception], branch: type[RiskbridgeError], standard: type[Exception]
) -> None:
    assert issubclass(error, RiskbridgeError) and issubclass(error, branch) and issubclass(error, standard)
    other = ModelError if branch is DataError else DataError
    assert not issubclass(error, other)


def test_every_public_name_resolves_from_the_package() -> None:
    for name in riskbridge.model.__all__:
        assert getattr(riskbridge.model, name) is not None, name
    assert set(riskbridge.model.__all__) <= set(dir(riskbridge.model))
    with pytest.raises(AttributeError):
        _ = riskbridge.model.no_such_name


def test_importing_the_package_or_its_package_module_imports_neither_torch_nor_monai() -> None:
    # Airflow parses the DAG files, which read package info; torch and MONAI must stay out of that process.
    probe = (
        "import sys; import riskbridge.model; import riskbridge.model.package; "
        "from riskbridge.model import read_package_info, reference_package_path; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (at any depth: lazy imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_volume_builder_reads_no_files() -> None:
    source = (ROOT / "harmonize" / "volume.py").read_text()
    assert "dcmread" not in source and "open(" not in source
    modules = _imported_modules(ROOT / "harmonize" / "volume.py")
    assert not {"os", "pathlib", "pydicom"} & modules
