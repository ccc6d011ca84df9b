"""The riskbridge.harmonize package: its public names resolve lazily to the modules that define them, importing one
harmonize module imports none of the others (notes needs spaCy and medspaCy, volume torch). That harmonize imports no
I/O layer or network or database client is import-linter's contract (pyproject.toml, scripts/lint_imports.sh)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import riskbridge.harmonize as harmonize

# Each module, and the harmonize modules that importing it may load.
ALLOWED = {
    "identity": {"identity", "identity_config", "identity_names"},
    "series": {"series", "series_rules", "series_rule_file", "rule_file"},
    "notes": {"notes", "notes_rule_file", "rule_file", "windows"},
    "notes_rule_file": {"notes_rule_file", "rule_file"},
    "units": {"units", "unit_table", "ucum"},
    "windows": {"windows"},
    "features": {"features", "windows"},
    "labels": {"labels", "windows", "rule_file"},
}
HEAVY = ("spacy", "medspacy", "torch", "monai")
PROBE = """
import json, sys
import riskbridge.harmonize.{module}
loaded = sorted(name for name in sys.modules if name.startswith("riskbridge.harmonize."))
print(json.dumps({{"loaded": loaded, "heavy": [name for name in {heavy!r} if name in sys.modules]}}))
"""


def test_every_public_name_resolves_to_the_object_its_module_defines() -> None:
    exports = harmonize._EXPORTS
    assert set(harmonize.__all__) == set(exports)
    for name in harmonize.__all__:
        module = importlib.import_module(f"riskbridge.harmonize.{exports[name]}")
        assert getattr(harmonize, name) is getattr(module, name), name
    assert set(harmonize.__all__) <= set(dir(harmonize))


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = harmonize.no_such_name  # the module __getattr__ raises it
    from riskbridge.harmonize import notes as note_flags  # a submodule, not an exported name

    assert note_flags.__name__ == "riskbridge.harmonize.notes"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_importing_one_module_imports_only_what_it_needs(module: str) -> None:
    probe = PROBE.format(module=module, heavy=HEAVY)
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(answer.stdout.strip().splitlines()[-1])
    assert {name.removeprefix("riskbridge.harmonize.") for name in report["loaded"]} <= ALLOWED[module]
    assert report["heavy"] == []  # notes imports spaCy/medspaCy only when it builds its pipeline
