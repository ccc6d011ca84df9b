"""Training tables and training: the synthetic table builder, deterministic training for a seed, calibration
improving ECE on held-out data, cross-validation with ablations, and the package written by train_package."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from riskbridge.dev.training_table import build_synthetic_table
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.model.calibration import Method, fit_calibrator
from riskbridge.model.data import TrainingTableError, load_table, read_manifest
from riskbridge.model.metrics import bootstrap_metrics, expected_calibration_error, paired_difference
from riskbridge.model.network import Strategy
from riskbridge.model.package import load_package
from riskbridge.model.preprocess import PreprocessConfig
from riskbridge.model.train import TrainOptions, cross_validate, fit_strategies, train_package

SPEC = load_default_feature_spec()
TINY = PreprocessConfig(spacing_mm=(12.0, 12.0, 12.0), size=(24, 16, 8), hu_window=(-1000.0, 400.0))
OPTIONS = TrainOptions(
    image_epochs=2,
    fusion_epochs=3,
    readout_epochs=3,
    dense_iterations=12,
    dense_batch_size=4,
    batch_size=16,
    embed_dim=8,
    hidden_dim=16,
    bootstrap=50,
)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_table(tmp_path_factory.mktemp("table"), SPEC, patients=60, seed=11, preprocess=TINY)


def test_the_synthetic_table_holds_every_unquarantined_patient_with_truth_features(table_dir: Path) -> None:
    from riskbridge.dev.synth.cohort import build_cohort, expected_labs, expected_quarantine

    manifest = read_manifest(table_dir)
    cohort = build_cohort(11, 60)
    usable = [p for p in cohort.patients if expected_quarantine(p) is None]
    assert manifest["rows"] == len(usable) == manifest["with_volume"]
    assert sum(manifest["excluded"].values()) == 60 - len(usable)
    assert manifest["feature_spec"] == SPEC.label and manifest["source"]["kind"] == "synthetic"
    table = load_table(table_dir, SPEC)
    assert table.keys == [p.key for p in usable]
    assert table.labels.tolist() == [p.label for p in usable]
    assert table.image_target.tolist() == [p.logit_components["image"] for p in usable]
    assert table.volumes.shape == (len(usable), 1, *TINY.size)
    assert table.present[:, 0].all()  # quarantined (no usable series) patients are out
    # labs are the truth's windowed values, missing stays missing (masked)
    rows = [json.loads(line) for line in (table_dir / "table.jsonl").read_text().splitlines()]
    for patient, row in zip(usable, rows, strict=True):
        truth = expected_labs(patient)
        for name, value, seen in zip(row["names"], row["values"], row["observed"], strict=True):
            if name in truth:
                entry = truth[name]
                assert seen == (entry is not None)
                if entry is not None:
                    assert value == entry["value"]
    no_labs = [i for i, p in enumerate(usable) if "no_labs" in p.edge_cases]
    no_notes = [i for i, p in enumerate(usable) if "no_notes" in p.edge_cases]
    assert no_labs and not table.present[no_labs, 1].any()
    assert no_notes and not table.present[no_notes, 2].any()
    volume = table.volumes[0, 0].astype(np.float32)
    assert volume.min() >= 0.0 and volume.max() <= 1.0 and volume.std() > 0.1  # lungs, tissue and air


def test_a_table_for_another_spec_or_without_manifest_is_rejected(table_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingTableError, match="chest_ct@1, not chest_ct@2"):
        load_table(table_dir, replace(SPEC, version=2))
    with pytest.raises(TrainingTableError, match=r"no manifest\.json"):
        load_table(tmp_path, SPEC)
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(TrainingTableError, match="refusing to overwrite"):
        build_synthetic_table(tmp_path, SPEC, patients=2, preprocess=TINY)


def _weights(strategy: Strategy, seed: int, table_dir: Path) -> dict[str, torch.Tensor]:
    table = load_table(table_dir, SPEC)
    fitted = fit_strategies(SPEC, table, [strategy], replace(OPTIONS, seed=seed))
    return {k: v.clone() for k, v in fitted[strategy].network.state_dict().items()}


def test_training_is_deterministic_for_a_seed(table_dir: Path) -> None:
    first = _weights("hybrid", 5, table_dir)
    second = _weights("hybrid", 5, table_dir)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = _weights("hybrid", 6, table_dir)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_calibration_fitted_on_one_split_improves_ece_on_held_out_data() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.0, 1.5, 6000)
    labels = (rng.random(6000) < 1.0 / (1.0 + np.exp(-true_logit))).astype(int)
    fit, held_out = slice(0, 3000), slice(3000, None)
    # overconfident (what an overfitted network produces): temperature fixes it; shifted too: Platt fixes it
    cases: list[tuple[Method, np.ndarray]] = [("temperature", 3.0 * true_logit), ("platt", 3.0 * true_logit + 1.0)]
    for method, logits in cases:
        before = expected_calibration_error(labels[held_out], 1.0 / (1.0 + np.exp(-logits[held_out])))
        calibrator = fit_calibrator(logits[fit], labels[fit], method)
        after = expected_calibration_error(labels[held_out], calibrator.probabilities(logits[held_out]))
        assert after < before / 3 and after < 0.05, (method, before, after)
    overconfident = 3.0 * true_logit
    temperature = fit_calibrator(overconfident[fit], labels[fit], "temperature")
    assert temperature.temperature is not None and 2.0 < temperature.temperature < 4.0
    with pytest.raises(ValueError, match="one class"):
        fit_calibrator(np.zeros(5), np.zeros(5))


def test_expected_calibration_error_uses_ten_equal_width_bins() -> None:
    # two bins: 0.15 (labels mean 0.5) and 0.95 (labels mean 1.0)
    labels = np.array([0, 1, 1, 1])
    probabilities = np.array([0.15, 0.15, 0.95, 0.95])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)
    assert expected_calibration_error(np.array([1]), np.array([1.0])) == 0.0


def test_bootstrap_intervals_repeat_for_a_seed_and_contain_the_estimate() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = labels * 0.3 + rng.random(400) * 0.7
    first = bootstrap_metrics(labels, scores, 0.5, resamples=200, seed=3)
    assert first == bootstrap_metrics(labels, scores, 0.5, resamples=200, seed=3)
    for estimate in first.values():
        assert estimate.low <= estimate.value <= estimate.high
    same = paired_difference(labels, scores, scores, resamples=100)
    assert same.value == same.low == same.high == 0.0


def test_cross_validation_scores_every_row_once_with_ablations(table_dir: Path) -> None:
    table = load_table(table_dir, SPEC)
    cv = cross_validate(SPEC, table, ["tabular", "hybrid"], OPTIONS, folds=2)
    assert sorted(np.unique(cv.folds).tolist()) == [0, 1]
    assert np.isfinite(cv.probabilities["hybrid"]).all()
    assert np.isfinite(cv.probabilities["tabular"]).sum() == table.present[:, 1:].any(axis=1).sum()
    without_image = cv.attention["hybrid-without-image"]
    assert (without_image[:, 0] == 0).all()
    block = cv.metrics("hybrid", resamples=50)
    assert set(block["metrics"]) == {"auroc", "auprc", "f1", "brier", "ece"}


def test_train_package_writes_a_verified_package_marked_synthetic(table_dir: Path, tmp_path: Path) -> None:
    table = load_table(table_dir, SPEC)
    sha, metrics = train_package(SPEC, table, tmp_path / "pkg", "hybrid", OPTIONS, folds=2, version="9.9.9")
    package = load_package(tmp_path / "pkg", expected_sha256=sha)
    assert package.config.version == "9.9.9" and package.config.feature_spec == SPEC.label
    assert package.synthetic and "NOT FOR CLINICAL USE" in (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert set(metrics["cross_validation"]["ablation_auroc"]) == {"image", "labs", "notes"}
    assert package.config.preprocess == TINY
    assert package.calibrator.method == "temperature"


def test_riskbridge_train_builds_a_table_trains_and_writes_a_package(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from riskbridge.cli import app

    runner = CliRunner()
    common = ["train", "--table", str(tmp_path / "table"), "--out", str(tmp_path / "pkg"), "--patients", "24"]
    result = runner.invoke(
        app, [*common, "--folds", "0", "--epochs", "1", "--fusion-epochs", "1", "--dense-iterations", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "sha256" in result.output
    package = load_package(tmp_path / "pkg")
    assert package.config.strategy == "hybrid" and package.synthetic
    bad = runner.invoke(app, [*common, "--strategy", "stacked"])
    assert bad.exit_code == 2 and "--strategy must be one of" in bad.output


def test_the_synthetic_table_carries_a_dense_nodule_mask_per_row(table_dir: Path) -> None:
    table = load_table(table_dir, SPEC)
    assert read_manifest(table_dir)["with_mask"] == len(table)
    assert table.masks is not None and table.has_mask is not None and table.has_mask.all()
    assert table.masks.shape == table.volumes.shape and set(np.unique(table.masks)) <= {0, 1}
    from riskbridge.dev.synth.cohort import build_cohort

    patients = {p.key: p for p in build_cohort(11, 60).patients}
    labelled = table.masks.any(axis=(1, 2, 3, 4))
    # a mask wherever the truth has a nodule, none where it has none
    assert labelled.tolist() == [bool(patients[key].nodules) for key in table.keys]
    assert 0 < labelled.sum() < len(table)


def test_a_mask_file_of_the_wrong_shape_is_rejected(table_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(table_dir, copy)
    first = json.loads((copy / "table.jsonl").read_text().splitlines()[0])
    np.savez_compressed(copy / first["mask"], mask=np.zeros((1, 2, 2, 2), dtype=np.uint8))
    with pytest.raises(TrainingTableError, match="expected"):
        load_table(copy, SPEC)


def test_the_detector_needs_dense_labels_and_the_resnet_does_not(table_dir: Path) -> None:
    table = load_table(table_dir, SPEC)
    unlabelled = replace(table, masks=None, has_mask=None)
    with pytest.raises(ValueError, match="dense nodule masks"):
        fit_strategies(SPEC, unlabelled, ["image"], OPTIONS)
    fitted = fit_strategies(SPEC, unlabelled, ["image"], replace(OPTIONS, image_encoder="resnet"))
    assert fitted["image"].network.config.image_encoder == "resnet"


def test_the_package_carries_the_validated_auroc_of_every_pattern(table_dir: Path, tmp_path: Path) -> None:
    table = load_table(table_dir, SPEC)
    _, metrics = train_package(SPEC, table, tmp_path / "pkg", "hybrid", OPTIONS, folds=2)
    patterns = metrics["patterns"]["table"]
    assert "image+labs+notes" in patterns and "image" in patterns
    full = patterns["image+labs+notes"]
    assert full["n"] == full["natural_n"] == int(table.present.all(axis=1).sum())
    assert patterns["image"]["n"] == len(table)  # every row has an image: each is validated on it alone
    for row in patterns.values():
        assert 0.0 <= row["auroc"]["low"] <= row["auroc"]["value"] <= row["auroc"]["high"] <= 1.0
        assert 0.0 <= row["ece"] <= 1.0 and row["positives"] <= row["n"]


def test_the_segmenter_learns_to_find_small_bright_spheres() -> None:
    from riskbridge.model.data import TrainingTable
    from riskbridge.model.dense import DenseOptions, train_segmenter
    from riskbridge.model.fitting import model_config, seed_everything
    from riskbridge.model.network import FusionNet, NoduleBurdenEncoder

    seed_everything(0, 2)
    rng = np.random.default_rng(0)
    n, size = 48, (24, 24, 16)
    grid = np.indices(size)
    volumes = rng.normal(0.1, 0.03, (n, 1, *size)).astype(np.float16)
    masks = np.zeros((n, 1, *size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            centre = rng.uniform(3, np.array(size) - 3)
            sphere = np.sqrt(sum((grid[a] - centre[a]) ** 2 for a in range(3))) <= rng.uniform(1.5, 3.0)
            volumes[i, 0][sphere] = 0.6
            masks[i, 0][sphere] = 1
    config = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), size=size, hu_window=(-1000.0, 400.0))
    table = TrainingTable(
        Path("."), {}, config, [str(i) for i in range(n)], np.zeros(n, dtype=np.int64),
        np.zeros((n, 18), np.float32), np.zeros((n, 14), np.float32), np.ones((n, 3), bool), volumes,
        np.full(n, np.nan), masks, np.ones(n, dtype=bool),
    )  # fmt: skip
    train, test = table.subset(np.arange(36)), table.subset(np.arange(36, n))
    network = FusionNet(replace(model_config(SPEC, train, "image", OPTIONS), detector_channels=(8, 16)))
    encoder = network.image_encoder
    assert isinstance(encoder, NoduleBurdenEncoder)
    history = train_segmenter(encoder, train, DenseOptions(iterations=200, patch_size=(16, 16, 8)), seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    with torch.no_grad():
        found = torch.sigmoid(encoder.segment(torch.from_numpy(test.volumes.astype(np.float32)))).numpy() >= 0.5
    truth = test.masks.astype(bool) if test.masks is not None else None
    assert truth is not None
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.5, dice
