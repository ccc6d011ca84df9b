"""Model packages: save/load round trip, checksum verification against tampering, feature-spec checks, the
shipped reference model, tabular_tensors, and the validated modality-pattern table (read with and without torch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from riskbridge.harmonize.features import PATTERNS, build_vector, load_default_feature_spec, present_modalities
from riskbridge.model.calibration import Calibrator
from riskbridge.model.network import FusionNet, ModelConfig
from riskbridge.model.package import (
    ModelPackageError,
    lab_feature_names,
    load_package,
    read_package_info,
    reference_package_path,
    save_package,
    tabular_tensors,
    validated_patterns,
)
from riskbridge.model.preprocess import PreprocessConfig

SPEC = load_default_feature_spec()


def small_config(strategy: Any = "hybrid") -> ModelConfig:
    return ModelConfig(
        name="unit",
        version="0.0.1",
        strategy=strategy,
        feature_spec=SPEC.label,
        lab_features=lab_feature_names(SPEC),
        note_features=SPEC.flags,
        preprocess=PreprocessConfig(spacing_mm=(12.0, 12.0, 12.0), size=(12, 8, 4), hu_window=(-1000.0, 400.0)),
        embed_dim=8,
        hidden_dim=8,
        image_channels=(4, 4, 4, 4),
    )


@pytest.fixture()
def package(tmp_path: Path) -> tuple[Path, str, FusionNet]:
    torch.manual_seed(0)
    network = FusionNet(small_config()).eval()
    metrics = {"training": {"synthetic": True, "rows": 10}, "threshold": 0.3}
    sha = save_package(tmp_path / "pkg", network.config, network, Calibrator("temperature", 0.5), metrics)
    return tmp_path / "pkg", sha, network


def test_a_saved_package_loads_with_the_same_weights_config_and_calibration(
    package: tuple[Path, str, FusionNet],
) -> None:
    path, sha, network = package
    loaded = load_package(path)
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.config == network.config
    assert loaded.threshold == 0.3 and loaded.synthetic
    rebuilt = loaded.build_network()
    assert not rebuilt.training
    for key, value in network.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    probabilities = loaded.calibrate(torch.tensor([0.0, 2.0]))
    assert torch.allclose(probabilities, torch.sigmoid(torch.tensor([0.0, 1.0])))
    card = (path / "MODEL_CARD.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and SPEC.label in card


@pytest.mark.parametrize("name", ["weights.pt", "config.json", "calibration.json", "metrics.json", "MODEL_CARD.md"])
def test_the_checksum_check_rejects_a_tampered_file(package: tuple[Path, str, FusionNet], name: str) -> None:
    path, _, _ = package
    target = path / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    target.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match=f"{name} does not match its sha256"):
        load_package(path)
    with pytest.raises(ModelPackageError, match=f"{name} does not match its sha256"):
        read_package_info(path)  # the torch-free reader checks exactly as much


def test_a_missing_unlisted_or_relisted_file_and_a_wrong_pin_are_rejected(
    package: tuple[Path, str, FusionNet], tmp_path: Path
) -> None:
    path, sha, _ = package
    with pytest.raises(ModelPackageError, match="not the expected"):
        load_package(path, expected_sha256="0" * 64)
    assert load_package(path, expected_sha256=sha).sha256 == sha

    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    (extra / "notes.txt").write_text("hello")
    with pytest.raises(ModelPackageError, match=r"not in SHA256SUMS: notes.txt"):
        load_package(extra)

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / "weights.pt").unlink()
    with pytest.raises(ModelPackageError, match=r"weights\.pt is missing"):
        load_package(missing)

    # an attacker who edits config.json and its line in SHA256SUMS changes the package sha256
    forged = tmp_path / "forged"
    shutil.copytree(path, forged)
    config = json.loads((forged / "config.json").read_text())
    config["strategy"] = "early"
    (forged / "config.json").write_text(json.dumps(config))
    import hashlib

    sums = (forged / "SHA256SUMS").read_text().splitlines()
    new_digest = hashlib.sha256((forged / "config.json").read_bytes()).hexdigest()
    sums = [f"{new_digest}  config.json" if line.endswith("config.json") else line for line in sums]
    (forged / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    assert load_package(forged).sha256 != sha
    with pytest.raises(ModelPackageError, match="not the expected"):
        load_package(forged, expected_sha256=sha)

    with pytest.raises(ModelPackageError, match="no SHA256SUMS"):
        load_package(tmp_path)


def test_saving_into_a_directory_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x")
    network = FusionNet(small_config())
    with pytest.raises(ModelPackageError, match=r"data\.csv"):
        save_package(tmp_path, network.config, network, Calibrator("none"), {})


def test_a_package_refuses_a_feature_spec_of_another_version(package: tuple[Path, str, FusionNet]) -> None:
    loaded = load_package(package[0])
    loaded.require_spec(SPEC)
    from dataclasses import replace

    with pytest.raises(ModelPackageError, match="chest_ct@2"):
        loaded.require_spec(replace(SPEC, version=2))
    with pytest.raises(ModelPackageError, match="other features"):
        loaded.require_spec(replace(SPEC, flags=SPEC.flags[:-1]))


def test_tabular_tensors_split_labs_demographics_and_flags_with_masks() -> None:
    vector = build_vector(SPEC, {"wbc": 12.0, "crp": None}, {"copd": True}, {"age_years": 70.0, "sex_male": 1.0})
    labs, notes, has_labs, has_notes = tabular_tensors(SPEC, vector)
    n_labs = len(lab_feature_names(SPEC))
    assert labs.shape == (2 * n_labs,) and notes.shape == (2 * len(SPEC.flags),)
    assert labs[0] == 12.0 and labs[n_labs] == 1.0  # wbc observed
    assert labs[1] == 3.0 and labs[n_labs + 1] == 0.0  # crp imputed, masked
    assert labs[n_labs - 2] == 70.0  # age after the labs
    assert has_labs and has_notes
    assert notes[SPEC.flags.index("copd")] == 1.0 and notes[len(SPEC.flags) :].all()

    nothing = build_vector(SPEC, {}, None, {"age_years": 70.0, "sex_male": 0.0})
    _, notes, has_labs, has_notes = tabular_tensors(SPEC, nothing)
    assert not has_labs and not has_notes  # demographics alone do not make the labs modality present
    assert not notes[len(SPEC.flags) :].any()

    from dataclasses import replace

    with pytest.raises(ModelPackageError, match="chest_ct@1"):
        tabular_tensors(replace(SPEC, version=2), vector)


def test_the_shipped_reference_model_loads_verifies_and_scores() -> None:
    path = reference_package_path()
    loaded = load_package(path)
    loaded.require_spec(SPEC)
    assert loaded.synthetic and "NOT FOR CLINICAL USE" in (path / "MODEL_CARD.md").read_text()
    assert sum(f.stat().st_size for f in path.iterdir()) < 4_000_000
    network = loaded.build_network()
    vector = build_vector(SPEC, {"crp": 80.0, "lactate": 3.0}, {"copd": True}, {"age_years": 80.0, "sex_male": 1.0})
    labs, notes, has_labs, has_notes = tabular_tensors(SPEC, vector)
    image = torch.full((1, 1, *loaded.config.preprocess.size), 0.1)
    present = torch.tensor([[True, has_labs, has_notes]])
    with torch.no_grad():
        out = network(image, torch.from_numpy(labs)[None], torch.from_numpy(notes)[None], present)
        without_image = network(
            None,
            torch.from_numpy(labs)[None],
            torch.from_numpy(notes)[None],
            present & False | torch.tensor([[False, True, True]]),
        )
    probability = loaded.calibrate(out.logits)
    assert 0.0 < float(probability[0]) < 1.0
    assert np.isclose(float(out.attention.sum()), 1.0)
    assert float(without_image.attention[0, 0]) == 0.0


def test_tabular_tensors_present_exactly_the_modalities_the_policy_names() -> None:
    for labs in ({}, {"wbc": 9.0}):
        for flags in (None, {"copd": False}):
            vector = build_vector(SPEC, labs, flags, {"age_years": 60.0})
            _, _, has_labs, has_notes = tabular_tensors(SPEC, vector)
            assert (True, has_labs, has_notes) == present_modalities(SPEC, vector, image_available=True)


def _pattern_metrics(table: Any) -> dict[str, Any]:
    return {"training": {"synthetic": True}, "threshold": 0.4, "patterns": {"description": "3-fold", "table": table}}


def _row(auroc: Any, n: int = 120) -> dict[str, Any]:
    return {"n": n, "natural_n": n // 2, "positives": n // 4, "auroc": auroc, "ece": 0.02}


def test_the_pattern_table_is_read_from_a_verified_package_with_and_without_torch(tmp_path: Path) -> None:
    table = {
        "image+labs+notes": _row({"value": 0.86, "low": 0.84, "high": 0.88}, 1650),
        "image+labs": _row({"value": 0.81, "low": 0.78, "high": 0.84}),
        "notes": _row(None, 12),  # one class only in its folds: no AUROC, so not validated
    }
    network = FusionNet(small_config())
    sha = save_package(tmp_path / "pkg", network.config, network, Calibrator("none"), _pattern_metrics(table))
    expected = {"image+labs+notes": 0.86, "image+labs": 0.81}
    assert load_package(tmp_path / "pkg").validated_patterns == expected
    info = read_package_info(tmp_path / "pkg", expected_sha256=sha)
    assert info.validated_patterns == expected
    assert (info.name, info.version, info.feature_spec) == ("unit", "0.0.1", SPEC.label)
    assert info.label == f"unit 0.0.1 {sha[:12]}"
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "| image+labs | 120 (60) | 30 | 0.810 (0.780 to 0.840) | 0.020 |" in card
    assert "| notes | 12 (6) | 3 | not validated | 0.020 |" in card
    # The pipeline's harmonize stage reads the table this way; it must not pull in torch (or MONAI, SciPy).
    probe = (
        "import sys; from pathlib import Path; from riskbridge.model.package import read_package_info; "
        f"print(sorted(read_package_info(Path({str(tmp_path / 'pkg')!r})).validated_patterns)); "
        "print(sorted(m for m in ('torch', 'monai', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(sorted(expected)), "[]"]


def test_a_package_without_a_pattern_table_validates_no_pattern(package: tuple[Path, str, FusionNet]) -> None:
    path, _, _ = package
    assert load_package(path).validated_patterns is None
    assert read_package_info(path).validated_patterns is None
    assert "by modality pattern" not in (path / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"table": [0.8]}, "patterns.table must map pattern names"),
        ({"description": "no table"}, "patterns.table must map pattern names"),
        ({"table": {"labs+image": _row({"value": 0.8})}}, r"patterns.table\['labs\+image'\]: not a modality pattern"),
        ({"table": {"image": 0.8}}, r"patterns.table\['image'\]: expected a mapping"),
        ({"table": {"image": _row(0.8)}}, r"\['image'\]: auroc must be a mapping with value"),
        ({"table": {"image": _row({"value": 1.2})}}, r"\['image'\]: auroc.value must lie in \[0, 1\]"),
        ({"table": {"image": _row({"value": "0.8"})}}, r"\['image'\]: auroc.value must be a number"),
        ({"table": {"image": _row({"value": float("nan")})}}, r"\['image'\]: auroc.value must be a number"),
    ],
)
def test_a_malformed_pattern_table_is_refused_naming_the_row(
    block: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ModelPackageError, match=message):
        validated_patterns({"patterns": block})
    network = FusionNet(small_config())
    metrics = {"training": {"synthetic": True}, "patterns": block}
    with pytest.raises(ModelPackageError, match=message):  # caught when the package is written, not at night
        save_package(tmp_path / "pkg", network.config, network, Calibrator("none"), metrics)


def test_every_pattern_name_the_table_may_use() -> None:
    table = {pattern: _row({"value": 0.5 + i / 100}) for i, pattern in enumerate(PATTERNS)}
    assert validated_patterns({"patterns": {"table": table}}) == {p: 0.5 + i / 100 for i, p in enumerate(PATTERNS)}
