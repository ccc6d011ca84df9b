"""Batch scoring: masking of a missing image, calibrated vs raw probabilities, package checksum and feature-spec
checks, failures reported rather than scored, loader workers, and ``riskbridge score`` end to end.

The package is a tiny real one: a FusionNet with seeded random weights saved by the model-core API
(:func:`riskbridge.model.package.save_package`); series are DICOM written by the preprocessing tests' helper.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_preprocess import marker_volume, write_series
from tiny_model import tiny_package
from typer.testing import CliRunner

from riskbridge.cli import app
from riskbridge.harmonize.features import FeatureSpec, FeatureVector, build_vector, load_default_feature_spec
from riskbridge.model.package import ModelPackageError, tabular_tensors
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor
from riskbridge.model.scoring import RequestDataset, Scorer, ScoreRequest, ScoringError, _split, collate

SPEC = load_default_feature_spec()
PREPROCESS = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(16, 16, 16), hu_window=(-1000.0, 400.0))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_package(tmp_path_factory.mktemp("package") / "tiny-0.0.1")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("staging") / "series"
    hu, _, _ = marker_volume()
    return directory, write_series(directory, hu)


def vector(seed: int, *, notes: bool = True) -> FeatureVector:
    """A feature vector with every lab observed (values vary with the seed) and notes when ``notes``."""
    rng = np.random.default_rng(seed)
    labs = {lab.name: float(rng.uniform(1.0, 100.0)) for lab in SPEC.labs}
    flags = {flag: bool(rng.integers(0, 2)) for flag in SPEC.flags} if notes else None
    return build_vector(SPEC, labs, flags, {"age_years": 60.0 + seed, "sex_male": float(seed % 2)})


def direct(package_dir: Path, image: np.ndarray | None, feature_vector: FeatureVector) -> tuple[float, list[float]]:
    """The raw probability and attention of one patient computed straight from the network (no Scorer)."""
    scorer = Scorer.from_package(package_dir, SPEC, device="cpu")
    labs, notes, has_labs, has_notes = tabular_tensors(SPEC, feature_vector)
    present = torch.tensor([[image is not None, has_labs, has_notes]])
    with torch.inference_mode():
        output = scorer.network(
            None if image is None else torch.from_numpy(image)[None],
            torch.from_numpy(labs)[None],
            torch.from_numpy(notes)[None],
            present,
        )
    return float(torch.sigmoid(output.logits)[0]), output.attention[0].tolist()


def test_missing_image_is_masked_out_not_zero_filled(package: Path, series: tuple[Path, str]) -> None:
    series_dir, uid = series
    requests = [
        ScoreRequest("with-image", series_dir, uid, vector(1)),
        ScoreRequest("no-image", None, None, vector(1)),
        ScoreRequest("no-image-no-notes", None, None, vector(2, notes=False)),
    ]
    results = Scorer.from_package(package, SPEC, device="cpu", batch_size=3).score(requests)
    assert [result.key for result in results] == ["with-image", "no-image", "no-image-no-notes"]
    with_image, no_image, labs_only = results

    assert with_image.attention["image"] > 0.0
    assert no_image.attention["image"] == 0.0
    assert no_image.attention["labs"] + no_image.attention["notes"] == pytest.approx(1.0)
    assert labs_only.attention == {"image": 0.0, "labs": pytest.approx(1.0), "notes": 0.0}

    # the scorer's numbers are the network's with the image modality absent (present False), batch mates or not
    raw, attention = direct(package, None, vector(1))
    assert no_image.raw_probability == pytest.approx(raw, abs=1e-6)
    assert list(no_image.attention.values()) == pytest.approx(attention, abs=1e-6)
    image = Preprocessor(PREPROCESS).from_series(series_dir, uid)
    raw, attention = direct(package, image, vector(1))
    assert with_image.raw_probability == pytest.approx(raw, abs=1e-6)
    assert list(with_image.attention.values()) == pytest.approx(attention, abs=1e-6)
    # ...and not the network's answer for an all-zero (zero-filled) volume
    zero_filled, _ = direct(package, np.zeros_like(image), vector(1))
    assert no_image.raw_probability != pytest.approx(zero_filled, abs=1e-6)


def test_probability_is_the_calibrated_raw_probability(package: Path, series: tuple[Path, str]) -> None:
    series_dir, uid = series
    requests = [ScoreRequest(f"p{i}", series_dir if i % 2 else None, uid, vector(i)) for i in range(5)]
    for result in Scorer.from_package(package, SPEC, device="cpu", batch_size=2).score(requests):
        logit = math.log(result.raw_probability / (1.0 - result.raw_probability))
        assert result.probability == pytest.approx(1.0 / (1.0 + math.exp(-(0.5 * logit - 0.2))), abs=1e-5)
        assert 0.0 < result.probability < 1.0
        assert sum(result.attention.values()) == pytest.approx(1.0)


def test_batch_size_and_workers_do_not_change_scores(package: Path, series: tuple[Path, str]) -> None:
    series_dir, uid = series
    requests = [ScoreRequest(f"p{i}", series_dir if i % 3 else None, uid, vector(i)) for i in range(7)]
    one_by_one = Scorer.from_package(package, SPEC, device="cpu", batch_size=1).score(requests)
    scorer = Scorer.from_package(package, SPEC, device="cpu", batch_size=4, workers=2)
    seen: list[tuple[int, int]] = []
    batched = scorer.score(requests, progress=lambda done, total: seen.append((done, total)))
    assert [r.key for r in batched] == [r.key for r in one_by_one]
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.attention == pytest.approx(b.attention, abs=1e-5)
    assert seen == [(4, 7), (7, 7)]
    assert scorer.last_stats.batches == 2 and scorer.last_stats.images == 4


def test_unreadable_series_is_reported_never_scored(package: Path, series: tuple[Path, str], tmp_path: Path) -> None:
    series_dir, uid = series
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"not dicom")
    requests = [
        ScoreRequest("good", series_dir, uid, vector(1)),
        ScoreRequest("broken", broken, "1.2.3", vector(2)),
        ScoreRequest("gone", tmp_path / "nowhere", "1.2.4", vector(3)),
    ]
    scorer = Scorer.from_package(package, SPEC, device="cpu")
    results, failures = scorer.score_with_failures(requests)
    assert [r.key for r in results] == ["good"]
    assert set(failures) == {"broken", "gone"}
    assert failures["broken"].startswith("image unreadable:")
    assert failures["gone"].startswith("image empty:") and "does not exist" in failures["gone"]
    assert "1.2.3" not in failures["broken"]  # UIDs hashed
    with pytest.raises(ScoringError, match="2 request"):
        scorer.score(requests)


def test_no_modality_the_model_reads_is_a_failure(tmp_path: Path) -> None:
    image_only = tiny_package(tmp_path / "image-only", strategy="image")
    results, failures = Scorer.from_package(image_only, SPEC, device="cpu").score_with_failures(
        [ScoreRequest("no-image", None, None, vector(1))]
    )
    assert results == []
    assert failures == {"no-image": "none of the modalities the model reads (image)"}


def test_tampered_package_is_rejected(package: Path, tmp_path: Path) -> None:
    copy = tiny_package(tmp_path / "copy")
    with (copy / "weights.pt").open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelPackageError, match=r"weights\.pt does not match its sha256"):
        Scorer.from_package(copy, SPEC, device="cpu")


def test_expected_package_sha256_is_enforced(package: Path) -> None:
    scorer = Scorer.from_package(package, SPEC, device="cpu")
    assert Scorer.from_package(package, SPEC, device="cpu", expected_sha256=scorer.sha256).sha256 == scorer.sha256
    with pytest.raises(ModelPackageError, match="is not the expected"):
        Scorer.from_package(package, SPEC, device="cpu", expected_sha256="0" * 64)


def test_feature_spec_version_mismatch_is_rejected(package: Path) -> None:
    newer: FeatureSpec = dataclasses.replace(SPEC, version=SPEC.version + 1)
    with pytest.raises(ModelPackageError, match="trained on feature spec chest_ct@1, not chest_ct@2"):
        Scorer.from_package(package, newer, device="cpu")


def test_vectors_of_another_spec_are_rejected_before_scoring(package: Path) -> None:
    foreign = dataclasses.replace(vector(1), spec="chest_ct@2")
    scorer = Scorer.from_package(package, SPEC, device="cpu")
    with pytest.raises(ModelPackageError, match="another feature spec"):
        scorer.score([ScoreRequest("p1", None, None, vector(1)), ScoreRequest("p2", None, None, foreign)])


def test_request_round_trips_through_json() -> None:
    request = ScoreRequest("k", Path("/staging/1.2/3.4"), "3.4", vector(3))
    assert ScoreRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    with pytest.raises(ValueError, match="unknown field"):
        ScoreRequest.from_json({**request.to_json(), "mrn": "123"})


def test_cli_scores_a_jsonl_file_end_to_end(package: Path, series: tuple[Path, str], tmp_path: Path) -> None:
    series_dir, uid = series
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"not dicom")
    requests = [
        ScoreRequest("with-image", series_dir, uid, vector(1)),
        ScoreRequest("no-image", None, None, vector(2)),
    ]
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests))
    out = tmp_path / "out" / "scores.jsonl"
    args = ["score", str(requests_file), "--out", str(out), "--package", str(package), "--device", "cpu"]
    cache = ["--cache-dir", str(tmp_path / "cache"), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, *cache])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["key"] for line in lines] == ["with-image", "no-image"]
    sha256 = Scorer.from_package(package, SPEC, device="cpu").sha256
    for line in lines:
        assert line["risk"] in ("low", "moderate", "high")
        assert line["model"] == "tiny" and line["model_version"] == "0.0.1" and line["package_sha256"] == sha256
        assert set(line["attention"]) == {"image", "labs", "notes"}
    assert lines[1]["attention"]["image"] == 0.0
    assert list((tmp_path / "cache").glob("*.npy"))

    # a failed request gets an error line and exit status 1; the good ones are still scored
    with requests_file.open("a") as stream:
        stream.write(json.dumps(ScoreRequest("broken", broken, "1.2.3", vector(3)).to_json()) + "\n")
    result = CliRunner().invoke(app, [*args, *cache])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "probability" in lines[0] and "error" not in lines[0]
    assert lines[2]["key"] == "broken" and lines[2]["error"].startswith("image unreadable")
    assert "probability" not in lines[2]


def test_cli_rejects_a_bad_request_line_and_a_tampered_package(package: Path, tmp_path: Path) -> None:
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(json.dumps(ScoreRequest("a", None, None, vector(1)).to_json()) + "\n{not json\n")
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(app, ["score", str(requests_file), "--out", str(out), "--package", str(package)])
    assert result.exit_code == 2
    assert "line 2" in result.output and not out.exists()

    requests_file.write_text(json.dumps(ScoreRequest("a", None, None, vector(1)).to_json()) + "\n")
    copy = tiny_package(tmp_path / "copy")
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"tiny"', '"tinier"'))
    result = CliRunner().invoke(app, ["score", str(requests_file), "--out", str(out), "--package", str(copy)])
    assert result.exit_code == 2
    assert "config.json does not match its sha256" in result.output and not out.exists()


def test_a_batch_split_in_two_scores_the_same(package: Path, series: tuple[Path, str]) -> None:
    # what the scorer does on CUDA out-of-memory: each half keeps its rows' images
    series_dir, uid = series
    requests = [ScoreRequest(f"p{i}", series_dir if i in (0, 3, 4) else None, uid, vector(i)) for i in range(5)]
    scorer = Scorer.from_package(package, SPEC, device="cpu")
    dataset = RequestDataset(requests, scorer.preprocessor, SPEC, scorer.uses)
    batch = collate([dataset[index] for index in range(len(requests))])
    assert batch.images is not None and len(batch.images) == 3
    first, second = _split(batch)
    assert first.images is not None and len(first.images) == 1
    assert second.images is not None and len(second.images) == 2
    whole = scorer._forward(batch, requests)
    halves = scorer._forward(first, requests) + scorer._forward(second, requests)
    assert [r.key for r in halves] == [r.key for r in whole]
    for a, b in zip(halves, whole, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
        assert a.attention == pytest.approx(b.attention, abs=1e-6)


def test_a_detector_package_scores_series_as_its_network_does(series: tuple[Path, str], tmp_path: Path) -> None:
    series_dir, uid = series
    package_dir = tiny_package(tmp_path / "detector", image_encoder="detector")
    requests = [ScoreRequest(f"p{i}", series_dir if i % 2 else None, uid, vector(i)) for i in range(4)]
    one_by_one = Scorer.from_package(package_dir, SPEC, device="cpu", batch_size=1).score(requests)
    batched = Scorer.from_package(package_dir, SPEC, device="cpu", batch_size=4).score(requests)
    image = Scorer.from_package(package_dir, SPEC, device="cpu").preprocessor.from_series(series_dir, uid)
    for request, a, b in zip(requests, one_by_one, batched, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
        raw, attention = direct(package_dir, image if request.series_dir else None, request.vector)
        assert a.raw_probability == pytest.approx(raw, abs=1e-5) and a.attention == pytest.approx(
            dict(zip(("image", "labs", "notes"), attention, strict=True)), abs=1e-5
        )
