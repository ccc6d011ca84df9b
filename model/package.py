"""Model packages: a trained network's weights, config, calibration, metrics and model card, checksummed together.

A package is a directory (format in docs/model.md)::

    config.json        ModelConfig (strategy, feature-spec version, feature layout, preprocessing, sizes)
    weights.pt         the FusionNet state dict (torch.save; loaded with weights_only=True)
    calibration.json   the Calibrator (temperature or Platt) fitted on a held-out calibration split
    metrics.json       cross-validated and held-out metrics with 95% CIs, the decision threshold, training data
    MODEL_CARD.md      intended use, data, metrics, limitations ("NOT FOR CLINICAL USE" for synthetic data)
    SHA256SUMS         sha256 of every other file (``<hex>  <name>`` lines, sorted by name)

The package's sha256 is the sha256 of SHA256SUMS, so it pins every file. :func:`load_package` verifies every
listed file, and rejects missing, unlisted or altered files with :class:`ModelPackageError`.

metrics.json may carry the cross-validated performance per modality pattern (``patterns``: AUROC, ECE and n for
image+labs+notes, image+labs, ...), which the minimum-data policy reads (:func:`validated_patterns`). The pipeline's
harmonize stage reads it with :func:`read_package_info`, which verifies the same checksums without torch: torch,
MONAI and SciPy are imported only by what builds, loads or saves a network, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from riskbridge.errors import ModelError
from riskbridge.harmonize.features import PATTERNS, FeatureSpec, FeatureVector, present_modalities

if TYPE_CHECKING:
    from torch import Tensor

    from riskbridge.model.calibration import Calibrator
    from riskbridge.model.network import FusionNet, ModelConfig

REFERENCE_NAME = "chest-ct-fusion"
REFERENCE_VERSION = "0.2.0"
PACKAGE_FILES = ("config.json", "weights.pt", "calibration.json", "metrics.json", "MODEL_CARD.md")
CHECKSUMS = "SHA256SUMS"


class ModelPackageError(ModelError, ValueError):
    """A model package is missing, incomplete, altered, or does not fit the feature spec it is used with."""


def lab_feature_names(spec: FeatureSpec) -> tuple[str, ...]:
    """The labs modality's features: the spec's labs, then its demographics."""
    return (*(lab.name for lab in spec.labs), *(d.name for d in spec.demographics))


def tabular_tensors(spec: FeatureSpec, vector: FeatureVector) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Split a feature vector into the network's labs and notes inputs (``[values, mask]`` float32 each).

    Returns ``(labs, notes, present_labs, present_notes)``: labs present when at least one lab (not a
    demographic) was observed, notes present when the note flags were observed. A vector built by another spec
    is a :class:`ModelPackageError`.
    """
    if vector.spec != spec.label or tuple(vector.names) != spec.names:
        raise ModelPackageError(f"feature vector built by {vector.spec}, the model reads {spec.label}")
    by_name = dict(zip(vector.names, zip(vector.values, vector.observed, strict=True), strict=True))
    lab_names = lab_feature_names(spec)

    def block(names: tuple[str, ...]) -> np.ndarray:
        values = [by_name[name][0] for name in names]
        mask = [1.0 if by_name[name][1] else 0.0 for name in names]
        return np.asarray(values + mask, dtype=np.float32)

    # The minimum-data policy names patterns with the same function, so it judges what the network is fed.
    _, present_labs, present_notes = present_modalities(spec, vector, image_available=False)
    return block(lab_names), block(spec.flags), present_labs, present_notes


def validated_patterns(metrics: Mapping[str, Any], source: str = "metrics.json") -> dict[str, float] | None:
    """The cross-validated AUROC per modality pattern in a package's metrics (``patterns.table``), for
    :func:`riskbridge.harmonize.features.decide`; None when the metrics have no ``patterns`` block.

    A row without an AUROC (a pattern whose folds held one class only) is left out: not validated. An unknown
    pattern name or an AUROC that is not a number in [0, 1] is a :class:`ModelPackageError` naming the row.
    """
    block = metrics.get("patterns")
    if block is None:
        return None
    table = block.get("table") if isinstance(block, Mapping) else None
    if not isinstance(table, Mapping):
        raise ModelPackageError(f"{source}: patterns.table must map pattern names to their metrics")
    found: dict[str, float] = {}
    for pattern, row in table.items():
        where = f"{source}: patterns.table[{pattern!r}]"
        if pattern not in PATTERNS:
            raise ModelPackageError(f"{where}: not a modality pattern (one of {', '.join(PATTERNS)})")
        if not isinstance(row, Mapping):
            raise ModelPackageError(f"{where}: expected a mapping with n, auroc, ece")
        auroc = row.get("auroc")
        if auroc is not None and not isinstance(auroc, Mapping):
            raise ModelPackageError(f"{where}: auroc must be a mapping with value, low, high, got {auroc!r}")
        value = None if auroc is None else auroc.get("value")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ModelPackageError(f"{where}: auroc.value must be a number, got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ModelPackageError(f"{where}: auroc.value must lie in [0, 1], got {value}")
        found[str(pattern)] = float(value)
    return found


class _PackageMetrics:
    """What a package's metrics say, for the loaded package and for its torch-free description alike."""

    path: Path
    metrics: dict[str, Any]

    @property
    def validated_patterns(self) -> dict[str, float] | None:
        """Cross-validated AUROC per modality pattern (see :func:`validated_patterns`); None: no table."""
        return validated_patterns(self.metrics, str(self.path / "metrics.json"))


@dataclass(frozen=True)
class ModelPackage(_PackageMetrics):
    """A loaded, verified package (see :func:`load_package`)."""

    path: Path
    config: ModelConfig
    sha256: str
    calibrator: Calibrator
    metrics: dict[str, Any]

    @property
    def threshold(self) -> float:
        """The decision threshold on calibrated probabilities chosen in training (F1-optimal on calibration)."""
        return float(self.metrics.get("threshold", 0.5))

    @property
    def synthetic(self) -> bool:
        """True when the package was trained on synthetic data (not for clinical use)."""
        return bool(self.metrics.get("training", {}).get("synthetic", False))

    def build_network(self) -> FusionNet:
        """The network with the package's weights loaded, in eval mode, on the CPU."""
        import torch

        from riskbridge.model.network import FusionNet

        network = FusionNet(self.config)
        try:
            state = torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True)
            network.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ModelPackageError(f"{self.path}: weights do not fit the config: {exc}") from None
        return network.eval()

    def calibrate(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities of the network's logits (same shape, float32)."""
        import torch

        values = self.calibrator.probabilities(logits.detach().float().cpu().numpy())
        return torch.from_numpy(values.astype(np.float32))

    def require_spec(self, spec: FeatureSpec) -> None:
        """ModelPackageError unless ``spec`` is the feature spec (version and layout) the package was trained on."""
        if spec.label != self.config.feature_spec:
            raise ModelPackageError(
                f"model {self.config.name} {self.config.version} was trained on feature spec "
                f"{self.config.feature_spec}, not {spec.label}"
            )
        if lab_feature_names(spec) != self.config.lab_features or spec.flags != self.config.note_features:
            raise ModelPackageError(f"feature spec {spec.label} lists other features than the model was trained on")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _estimate_text(estimate: dict[str, float]) -> str:
    return f"{estimate['value']:.3f} ({estimate['low']:.3f} to {estimate['high']:.3f})"


def _pattern_lines(block: Any) -> list[str]:
    if not isinstance(block, Mapping) or not isinstance(block.get("table"), Mapping):
        return []
    lines = [f"by modality pattern ({block.get('description', '')}):", ""]
    lines += ["| pattern | n (natural) | positives | auroc (95% CI) | ece |", "|---|---|---|---|---|"]
    table = block["table"]
    for pattern in [p for p in PATTERNS if p in table] + sorted(set(table) - set(PATTERNS)):
        row = table[pattern] if isinstance(table[pattern], Mapping) else {}
        raw = row.get("auroc")
        auroc: dict[str, Any] = dict(raw) if isinstance(raw, Mapping) else {}
        if all(isinstance(auroc.get(key), int | float) for key in ("value", "low", "high")):
            auroc_text = _estimate_text(auroc)
        else:
            auroc_text = f"{auroc['value']:.3f}" if isinstance(auroc.get("value"), int | float) else "not validated"
        ece = row.get("ece")
        ece_text = f"{ece:.3f}" if isinstance(ece, int | float) else "-"
        lines.append(
            f"| {pattern} | {row.get('n', '-')} ({row.get('natural_n', '-')}) | {row.get('positives', '-')} "
            f"| {auroc_text} | {ece_text} |"
        )
    return [*lines, ""]


def _encoder_line(config: ModelConfig) -> str:
    if config.image_encoder == "detector":
        return (
            f"- image encoder: nodule detector (MONAI U-Net, channels {config.detector_channels}, trained on dense "
            "nodule masks that are used in training only) read out as nodule burden, count, volume, largest "
            "diameter and peak probability; at scoring time it sees the image only"
        )
    return f"- image encoder: MONAI 3D ResNet (channels {config.image_channels}, {config.image_pool} pool), end to end"


def model_card(config: ModelConfig, metrics: dict[str, Any]) -> str:
    """The MODEL_CARD.md text: intended use, training data, metrics with CIs, limitations."""
    training = metrics.get("training", {})
    synthetic = bool(training.get("synthetic", False))
    lines = [f"# Model card: {config.name} {config.version}", ""]
    if synthetic:
        lines += [
            "**NOT FOR CLINICAL USE.** This model was trained on synthetic data (the riskbridge synthetic cohort); "
            "its scores demonstrate the pipeline and mean nothing about real patients.",
            "",
        ]
    lines += [
        "## Intended use",
        "",
        "Ranks adult patients with a chest CT by the risk of the outcome the training data defines, from the thin "
        "lung-kernel axial CT series, labs within 48 h before the scan, comorbidities from notes of the past year, "
        "age and sex. Decision support for a clinician reviewing a worklist, never an automated decision. Scores "
        f"only vectors built by feature spec `{config.feature_spec}`.",
        "",
        "## Model",
        "",
        f"- strategy: `{config.strategy}` (modalities image, labs, notes; missing modalities are masked out)",
        f"- image input: {config.preprocess.size} voxels at {config.preprocess.spacing_mm} mm (RAS), "
        f"HU window {config.preprocess.hu_window}",
        _encoder_line(config),
        f"- labs modality: {', '.join(config.lab_features)} (+ missingness mask)",
        f"- notes modality: {', '.join(config.note_features)} (+ missingness mask)",
        f"- embedding {config.embed_dim}, hidden {config.hidden_dim}, modality dropout {config.modality_dropout}",
        f"- calibration: {metrics.get('calibration', {}).get('method', 'none')}",
        "",
        "## Training data",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in sorted(training.items()) if key not in ("history", "options")]
    options = training.get("options", {})
    if options:
        lines.append("- options: " + ", ".join(f"{key} {value}" for key, value in sorted(options.items())))
    lines += ["", "## Performance", ""]
    for section in ("cross_validation", "calibration_split"):
        block = metrics.get(section)
        if not block:
            continue
        lines += [f"{section.replace('_', ' ')} ({block.get('description', '')}):", ""]
        lines += ["| metric | value (95% CI) |", "|---|---|"]
        for name, estimate in block.get("metrics", {}).items():
            lines.append(f"| {name} | {_estimate_text(estimate)} |")
        for modality, estimate in block.get("ablation_auroc", {}).items():
            lines.append(f"| auroc without {modality} at inference | {_estimate_text(estimate)} |")
        lines.append("")
    lines += _pattern_lines(metrics.get("patterns"))
    lines += [
        "## Limitations",
        "",
        "- Validated only by cross-validation on the training cohort; no external validation.",
        "- Depends on the series selection, lab windows, unit normalization and note extraction upstream.",
        "- Attention weights show which modality the fusion leaned on, not a causal explanation.",
        *(f"- {text}" for text in metrics.get("limitations", [])),
        "",
    ]
    return "\n".join(lines)


def save_package(
    out_dir: Path, config: ModelConfig, network: FusionNet, calibrator: Calibrator, metrics: dict[str, Any]
) -> str:
    """Write a package into ``out_dir`` (created; must not hold other files) and return its sha256.

    ``metrics`` should hold ``training`` (the data's description, ``synthetic`` true or false), ``threshold``
    and the metric blocks, optionally ``limitations`` (lines for the card); the model card is written from it.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    allowed = {*PACKAGE_FILES, CHECKSUMS}
    stray = sorted(p.name for p in out_dir.iterdir() if p.name not in allowed)
    if stray:
        raise ModelPackageError(f"{out_dir}: not an empty or package directory (holds {', '.join(stray[:5])})")
    validated_patterns(metrics)  # a malformed pattern table fails here, not in the first nightly run that reads it
    metrics = {**metrics, "calibration": calibrator.to_dict()}
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    torch.save(state, out_dir / "weights.pt")
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    (out_dir / "calibration.json").write_text(json.dumps(calibrator.to_dict(), indent=2, sort_keys=True) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(config, metrics))
    sums = "".join(f"{_sha256(out_dir / name)}  {name}\n" for name in sorted(PACKAGE_FILES))
    (out_dir / CHECKSUMS).write_text(sums)
    return hashlib.sha256(sums.encode()).hexdigest()


def _verified(path: Path, expected_sha256: str | None) -> str:
    """Check the package at ``path`` against its SHA256SUMS and return the package sha256."""
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        raise ModelPackageError(f"{path}: not a model package (no {CHECKSUMS})")
    sums_bytes = sums_path.read_bytes()
    sha256 = hashlib.sha256(sums_bytes).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ModelPackageError(
            f"{path}: package sha256 {sha256[:12]}... is not the expected {expected_sha256[:12]}..."
        )
    listed: dict[str, str] = {}
    for number, line in enumerate(sums_bytes.decode("utf-8", "replace").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise ModelPackageError(f"{path}: {CHECKSUMS} line {number} is malformed")
        listed[name] = digest
    missing = sorted(set(PACKAGE_FILES) - set(listed))
    if missing:
        raise ModelPackageError(f"{path}: {CHECKSUMS} does not list {', '.join(missing)}")
    present = {p.name for p in path.iterdir()} - {CHECKSUMS}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ModelPackageError(f"{path}: file(s) not in {CHECKSUMS}: {', '.join(unlisted)}")
    for name, digest in sorted(listed.items()):
        if not (path / name).is_file():
            raise ModelPackageError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise ModelPackageError(f"{path}: {name} does not match its sha256 (altered or damaged)")
    return sha256


def load_package(path: Path, expected_sha256: str | None = None) -> ModelPackage:
    """Load and verify a package: every file's checksum, no file missing or unlisted, the config parses.

    ``expected_sha256`` pins the whole package (the sha256 recorded with earlier scores, say).
    """
    from riskbridge.model.calibration import Calibrator
    from riskbridge.model.network import ModelConfig

    path = Path(path)
    sha256 = _verified(path, expected_sha256)
    try:
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        calibrator = Calibrator.from_dict(json.loads((path / "calibration.json").read_text()))
        metrics = json.loads((path / "metrics.json").read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelPackageError(f"{path}: unreadable package content: {exc}") from None
    return ModelPackage(path, config, sha256, calibrator, metrics)


@dataclass(frozen=True)
class PackageInfo(_PackageMetrics):
    """What a verified package says about itself without its network: name, version, feature spec, metrics."""

    path: Path
    name: str
    version: str
    feature_spec: str
    sha256: str
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        """``name version sha256[:12]``, as the ledger records a run's model."""
        return f"{self.name} {self.version} {self.sha256[:12]}"


def read_package_info(path: Path, expected_sha256: str | None = None) -> PackageInfo:
    """Verify a package exactly as :func:`load_package` does and read its name, version, feature spec and
    metrics, without importing torch (for the pipeline's harmonize stage, which needs only the pattern table)."""
    path = Path(path)
    sha256 = _verified(path, expected_sha256)
    try:
        config = json.loads((path / "config.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text())
        name, version, spec = str(config["name"]), str(config["version"]), str(config["feature_spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelPackageError(f"{path}: unreadable package content: {exc}") from None
    if not isinstance(metrics, dict):
        raise ModelPackageError(f"{path}: metrics.json must hold a JSON object")
    return PackageInfo(path, name, version, spec, sha256, metrics)


def reference_package_path() -> Path:
    """The reference model shipped with riskbridge (trained on the synthetic cohort; not for clinical use)."""
    resource = resources.files("riskbridge.model").joinpath("reference", f"{REFERENCE_NAME}-{REFERENCE_VERSION}")
    path = Path(str(resource))
    if not (path / CHECKSUMS).is_file():
        raise ModelPackageError(f"the reference model package is not installed at {path}")
    return path
