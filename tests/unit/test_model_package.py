"""Model packages: save/load round trip, checksum verification against tampering, feature-spec checks, the
shipped reference model, and tabular_tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from riskbridge.harmonize.features import build_vector, load_default_feature_spec
from riskbridge.model.calibration import Calibrator
from riskbridge.model.network import FusionNet, ModelConfig
from riskbridge.model.package import (
    ModelPackageError,
    lab_feature_names,
    load_package,
    reference_package_path,
    save_package,
    tabular_tensors,
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
