"""Training the fusion model: seeded splits, two-stage fitting, calibration, cross-validation and the package.

How one model is fitted (:func:`fit_strategies`, docs/model.md):

1. The training rows are split, stratified and seeded, into a fitting part and a calibration part
   (``TrainOptions.calibration_fraction``); the calibration part picks the best epoch, fits the calibrator and the
   F1 threshold, and is never trained on. A test fold never takes part in any of this.
2. The image encoder is trained as the image-only model. The ``detector`` encoder (default) first trains its
   U-Net on dense nodule masks (:mod:`riskbridge.model.dense`), computes every row's burden features once and
   then fits its read-out and the image head on the labels; the ``resnet`` encoder is trained end to end (random
   left-right and cranio-caudal flips).
3. Every other strategy reuses that encoder, frozen, with its embeddings computed once, and trains its tabular
   encoders, attention and heads on top (so the five strategies share one image encoder per fold and the
   comparison isolates the fusion; it also keeps CPU training to minutes).

Determinism: :func:`seed_everything` seeds Python, numpy and torch and turns on
``torch.use_deterministic_algorithms``; batches are drawn from a generator seeded per run, so the same table,
options and seed give the same weights.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import Tensor

from riskbridge.harmonize.features import FeatureSpec
from riskbridge.model.calibration import Calibrator, Method, fit_calibrator
from riskbridge.model.data import TrainingTable
from riskbridge.model.dense import DenseOptions, burden_table, train_segmenter
from riskbridge.model.metrics import (
    best_f1_threshold,
    bootstrap_metrics,
    expected_calibration_error,
)
from riskbridge.model.network import FusionNet, ModelConfig, NoduleBurdenEncoder, Strategy
from riskbridge.model.package import lab_feature_names, save_package
from riskbridge.records import MODALITIES, all_patterns, pattern_name

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings; the defaults train the reference model in minutes on two CPU threads."""

    image_epochs: int = 6
    fusion_epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    calibration_fraction: float = 0.2
    calibration: Method = "temperature"
    seed: int = 0
    threads: int = 1
    embed_dim: int = 32
    hidden_dim: int = 64
    modality_dropout: float = 0.25
    bootstrap: int = 1000
    image_target_weight: float = 1.0
    image_encoder: Literal["resnet", "detector"] = "detector"
    readout_epochs: int = 40
    dense_iterations: int = 4000
    dense_batch_size: int = 8
    dense_patch: tuple[int, int, int] = (40, 40, 24)
    dense_learning_rate: float = 2e-3

    def dense_options(self) -> DenseOptions:
        """The segmenter's training options (detector encoder)."""
        return DenseOptions(
            iterations=self.dense_iterations,
            batch_size=self.dense_batch_size,
            patch_size=self.dense_patch,
            peak_learning_rate=self.dense_learning_rate,
            weight_decay=self.weight_decay,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (recorded in the package's metrics)."""
        return asdict(self)


@dataclass
class FittedModel:
    """A fitted network with its calibrator and threshold, and its calibration-split predictions."""

    network: FusionNet
    calibrator: Calibrator
    threshold: float
    calibration_labels: np.ndarray
    calibration_logits: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    dense_history: list[dict[str, float]] = field(default_factory=list)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities."""
        return self.calibrator.probabilities(logits)


def seed_everything(seed: int, threads: int = 2) -> None:
    """Seed Python, numpy and torch, cap torch's threads and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


def fit_tabular_scaling(labs: np.ndarray, n_features: int) -> tuple[tuple[float, ...], ...]:
    """Per labs-modality feature: ``(center, scale, log)`` from the observed training values.

    A feature is log-transformed when all its observed values are positive and skewed (99th percentile over
    three times the median); center is the median and scale the IQR / 1.349 (the standard deviation, or 1, when
    the IQR is zero).
    """
    centers, scales, logs = [], [], []
    for j in range(n_features):
        observed = labs[labs[:, n_features + j] > 0.5, j].astype(np.float64)
        if observed.size == 0:
            centers.append(0.0)
            scales.append(1.0)
            logs.append(False)
            continue
        median = float(np.median(observed))
        log = bool(observed.min() > 0 and median > 0 and np.percentile(observed, 99) > 3 * median)
        values = np.log(observed) if log else observed
        q1, q2, q3 = np.percentile(values, [25, 50, 75])
        scale = float((q3 - q1) / 1.349) or float(values.std()) or 1.0
        centers.append(float(q2))
        scales.append(scale if math.isfinite(scale) and scale > 0 else 1.0)
        logs.append(log)
    return tuple(centers), tuple(scales), tuple(logs)


def model_config(
    spec: FeatureSpec,
    table: TrainingTable,
    strategy: Strategy,
    options: TrainOptions,
    name: str = "chest-ct-fusion",
    version: str = "0.1.0",
) -> ModelConfig:
    """The config of a model trained on ``table`` (tabular scaling fitted on these rows)."""
    lab_names = lab_feature_names(spec)
    center, scale, log = fit_tabular_scaling(table.labs, len(lab_names))
    return ModelConfig(
        name=name,
        version=version,
        strategy=strategy,
        feature_spec=spec.label,
        lab_features=lab_names,
        note_features=spec.flags,
        preprocess=table.preprocess,
        embed_dim=options.embed_dim,
        hidden_dim=options.hidden_dim,
        modality_dropout=options.modality_dropout,
        image_encoder=options.image_encoder,
        lab_center=center,
        lab_scale=scale,
        lab_log=log,
    )


def _tensors(table: TrainingTable, index: np.ndarray | slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.from_numpy(np.ascontiguousarray(table.labs[index])),
        torch.from_numpy(np.ascontiguousarray(table.notes[index])),
        torch.from_numpy(np.ascontiguousarray(table.present[index])),
        torch.from_numpy(np.ascontiguousarray(table.labels[index])),
    )


def _images(table: TrainingTable, index: np.ndarray) -> Tensor:
    return torch.from_numpy(table.volumes[index].astype(np.float32))


def _flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random left-right (x) and cranio-caudal (z) flips, per sample: the outcome does not depend on either."""
    flips = torch.rand((images.shape[0], 2), generator=generator) < 0.5
    out = images.clone()
    for i in range(images.shape[0]):
        dims = [axis for axis, flip in zip((2, 4), flips[i].tolist(), strict=True) if flip]
        if dims:
            out[i] = torch.flip(images[i], [d - 1 for d in dims])
    return out


@torch.no_grad()
def image_embeddings(network: FusionNet, table: TrainingTable, batch_size: int = 64) -> Tensor:
    """The image encoder's embeddings of every row (zeros where there is no image), eval mode."""
    network.eval()
    return table.encode_images(network.encode_image, network.config.embed_dim, batch_size)


@torch.no_grad()
def predict(
    network: FusionNet,
    table: TrainingTable,
    *,
    drop: str | None = None,
    keep: Sequence[str] | None = None,
    embeddings: Tensor | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits and attention of every row in eval mode, optionally with modality ``drop`` removed for all rows, or
    with only the modalities ``keep`` left.

    Returns ``(logits, attention, scored)``; ``scored`` is False (logit NaN) for rows left with none of the
    strategy's modalities.
    """
    network.eval()
    n = len(table)
    present = table.present.copy()
    if drop is not None:
        present[:, MODALITIES.index(drop)] = False
    if keep is not None:
        present &= np.array([m in keep for m in MODALITIES])
    usable = (present & np.asarray(network.config.uses)).any(axis=1)
    logits = np.full(n, np.nan)
    attention = np.zeros((n, 3))
    rows = np.flatnonzero(usable)
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        labs, notes, _, _ = _tensors(table, index)
        mask = torch.from_numpy(present[index])
        kwargs: dict[str, Any] = {}
        image = None
        if embeddings is not None:
            kwargs["image_embedding"] = embeddings[index]
        elif network.config.uses[0] and bool(mask[:, 0].any()):
            image = _images(table, index)
        out = network(image, labs, notes, mask, **kwargs)
        logits[index] = out.logits.double().numpy()
        attention[index] = out.attention.double().numpy()
    return logits, attention, usable


def _train_loop(
    network: FusionNet,
    fit: TrainingTable,
    valid: TrainingTable,
    epochs: int,
    options: TrainOptions,
    seed: int,
    embeddings: tuple[Tensor, Tensor] | None,
    progress: Callable[[int, int], None] | None,
    burden: tuple[Tensor, Tensor] | None = None,
) -> list[dict[str, float]]:
    """AdamW on BCE; keeps the weights of the epoch with the lowest calibration-split loss.

    ``embeddings`` are a frozen encoder's (fit, calibration) embeddings; ``burden`` the detector encoder's burden
    features, whose read-out is trained here. In the end-to-end image stage, rows with an ``image_target`` add
    ``image_target_weight`` times the squared error of a linear read-out of the embedding against the
    standardized target (auxiliary supervision; the read-out is discarded after training).
    """
    parameters = [p for p in network.parameters() if p.requires_grad]
    targets = fit.image_target
    auxiliary: torch.nn.Module | None = None
    uses_image_input = network.config.uses[0] and embeddings is None and burden is None
    detector = cast(NoduleBurdenEncoder, network.image_encoder) if burden is not None else None
    if uses_image_input and options.image_target_weight > 0 and np.isfinite(targets).any():
        known = targets[np.isfinite(targets)]
        target_mean, target_std = float(known.mean()), float(known.std()) or 1.0
        auxiliary = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(network.config.embed_dim, 1))
        parameters += list(auxiliary.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state = math.inf, copy.deepcopy(network.state_dict())
    history: list[dict[str, float]] = []
    valid_y = valid.labels
    for epoch in range(epochs):
        network.train()
        if embeddings is not None and network.image_encoder is not None:
            network.image_encoder.eval()  # frozen: its BatchNorm statistics stay those of the image stage
        order = torch.randperm(len(fit), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), options.batch_size):
            index = np.sort(order[start : start + options.batch_size])
            labs, notes, present, target = _tensors(fit, index)
            kwargs: dict[str, Any] = {}
            image = None
            if embeddings is not None:
                kwargs["image_embedding"] = embeddings[0][index]
            elif detector is not None and burden is not None:
                kwargs["image_embedding"] = detector.embed(burden[0][index])
            elif uses_image_input:
                image = _flip(_images(fit, index), generator)
            if auxiliary is not None and image is not None:
                embedding = network.encode_image(image)
                out = network(None, labs, notes, present, image_embedding=embedding)
                loss = network.loss(out, target, present)
                wanted = torch.from_numpy((targets[index] - target_mean) / target_std).float()
                known_rows = torch.isfinite(wanted)
                if bool(known_rows.any()):
                    guess = auxiliary(embedding).squeeze(1)
                    error = (guess[known_rows] - wanted[known_rows]) ** 2
                    loss = loss + options.image_target_weight * error.mean()
            else:
                out = network(image, labs, notes, present, **kwargs)
                loss = network.loss(out, target, present)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        valid_embeddings = embeddings[1] if embeddings is not None else None
        if detector is not None and burden is not None:
            with torch.no_grad():
                valid_embeddings = detector.embed(burden[1])
        logits, _, scored = predict(network, valid, embeddings=valid_embeddings)
        valid_loss = float(np.mean(np.logaddexp(0.0, logits[scored]) - valid_y[scored] * logits[scored]))
        history.append({"epoch": epoch + 1, "train_loss": total / len(fit), "valid_loss": valid_loss})
        if valid_loss < best_loss:
            best_loss, best_state = valid_loss, copy.deepcopy(network.state_dict())
        if progress:
            progress(epoch + 1, epochs)
    network.load_state_dict(best_state)
    network.eval()
    return history


def split_calibration(table: TrainingTable, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of the rows into (fit, calibration) index arrays."""
    index = np.arange(len(table))
    fit, calibration = train_test_split(index, test_size=fraction, stratify=table.labels, random_state=seed)
    return np.sort(fit), np.sort(calibration)


def fit_strategies(
    spec: FeatureSpec,
    table: TrainingTable,
    strategies: Sequence[Strategy],
    options: TrainOptions,
    *,
    name: str = "chest-ct-fusion",
    version: str = "0.1.0",
    progress: Progress | None = None,
) -> dict[str, FittedModel]:
    """Fit each strategy on ``table`` (image encoder trained once, then shared frozen; see the module docstring)."""
    seed_everything(options.seed, options.threads)
    fit_index, calibration_index = split_calibration(table, options.calibration_fraction, options.seed)
    fit, valid = table.subset(fit_index), table.subset(calibration_index)
    base = model_config(spec, fit, "image", options, name, version)
    fitted: dict[str, FittedModel] = {}
    image_model: FusionNet | None = None
    cached: tuple[Tensor, Tensor] | None = None
    needs_image = [s for s in strategies if s != "tabular"]
    if needs_image:
        torch.manual_seed(options.seed)
        image_model = FusionNet(base)
        image_model, cached, history, dense_history = _fit_image_stage(image_model, fit, valid, options, progress)
        if "image" in strategies:
            fitted["image"] = _finish(image_model, valid, options, history, cached[1])
            fitted["image"].dense_history = dense_history
    for strategy in strategies:
        if strategy == "image":
            continue
        torch.manual_seed(options.seed + 1 + list(STRATEGY_ORDER).index(strategy))
        network = FusionNet(base.with_strategy(strategy))
        embeddings = None
        if network.image_encoder is not None:
            assert image_model is not None and image_model.image_encoder is not None and cached is not None
            network.image_encoder.load_state_dict(image_model.image_encoder.state_dict())
            network.image_encoder.requires_grad_(False)
            embeddings = cached
        history = _train_loop(
            network,
            fit,
            valid,
            options.fusion_epochs,
            options,
            options.seed + 1,
            embeddings,
            _stage_progress(progress, strategy),
        )
        fitted[strategy] = _finish(network, valid, options, history, None if embeddings is None else embeddings[1])
    return fitted


STRATEGY_ORDER = ("image", "tabular", "early", "late", "hybrid")
FUSION_STRATEGIES = ("early", "late", "hybrid")  # the ones that read every modality: the ablations


def _fit_image_stage(
    network: FusionNet, fit: TrainingTable, valid: TrainingTable, options: TrainOptions, progress: Progress | None
) -> tuple[FusionNet, tuple[Tensor, Tensor], list[dict[str, float]], list[dict[str, float]]]:
    """Train the image-only model; returns it, its (fit, calibration) embeddings and the two loss histories."""
    if isinstance(network.image_encoder, NoduleBurdenEncoder):
        encoder = network.image_encoder
        dense_history = train_segmenter(
            encoder, fit, options.dense_options(), options.seed, _stage_progress(progress, "segmenter")
        )
        encoder.segmenter.requires_grad_(False)
        burden = (burden_table(encoder, fit), burden_table(encoder, valid))
        history = _train_loop(
            network, fit, valid, options.readout_epochs, options, options.seed, None,
            _stage_progress(progress, "image"), burden=burden,
        )  # fmt: skip
        with torch.no_grad():
            return network, (encoder.embed(burden[0]), encoder.embed(burden[1])), history, dense_history
    history = _train_loop(
        network, fit, valid, options.image_epochs, options, options.seed, None, _stage_progress(progress, "image")
    )
    return network, (image_embeddings(network, fit), image_embeddings(network, valid)), history, []


def _stage_progress(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(stage, done, total)


def _finish(
    network: FusionNet,
    valid: TrainingTable,
    options: TrainOptions,
    history: list[dict[str, float]],
    embeddings: Tensor | None,
) -> FittedModel:
    """Fit the calibrator and the F1 threshold on the calibration split."""
    logits, _, scored = predict(network, valid, embeddings=embeddings)
    labels = valid.labels[scored]
    calibrator = fit_calibrator(logits[scored], labels, options.calibration)
    threshold = best_f1_threshold(labels, calibrator.probabilities(logits[scored]))
    return FittedModel(network, calibrator, threshold, labels, logits[scored], history)


@dataclass
class CrossValidation:
    """Out-of-fold predictions of every strategy (and ablation) over the whole table."""

    labels: np.ndarray
    folds: np.ndarray
    logits: dict[str, np.ndarray]  # key: strategy, or "strategy-without-modality" for ablations
    probabilities: dict[str, np.ndarray]
    raw_probabilities: dict[str, np.ndarray]
    thresholds: dict[str, list[float]]
    attention: dict[str, np.ndarray]

    def metrics(self, key: str, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Metrics with bootstrap CIs of one strategy's pooled out-of-fold predictions (scored rows only)."""
        p = self.probabilities[key]
        scored = np.isfinite(p)
        threshold = float(np.mean(self.thresholds[base_strategy(key)]))
        estimates = bootstrap_metrics(self.labels[scored], p[scored], threshold, resamples, seed)
        raw = self.raw_probabilities[key][scored]
        return {
            "n": int(scored.sum()),
            "metrics": {k: v.to_dict() for k, v in estimates.items()},
            "ece_uncalibrated": round(expected_calibration_error(self.labels[scored], raw), 4),
            "threshold": round(threshold, 4),
        }

    def patterns(self, strategy: str, present: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Per missingness pattern: AUROC (bootstrap CI) and ECE of ``strategy`` with each test patient's inputs
        reduced to the pattern (patients with at least its modalities: ``n``), and how many patients have exactly
        that pattern (``natural_n``). Patterns with fewer than 20 patients or one class are left out (no AUROC).
        """
        table: dict[str, Any] = {}
        for pattern in all_patterns():
            key = f"{strategy}@{pattern}"
            if key not in self.probabilities:
                continue
            p = self.probabilities[key]
            scored = np.isfinite(p)
            y = self.labels[scored]
            if scored.sum() < 20 or y.min() == y.max():
                continue
            auroc = bootstrap_metrics(y, p[scored], 0.5, resamples, seed)["auroc"]
            table[pattern] = {
                "n": int(scored.sum()),
                "natural_n": int(sum(pattern_name(row) == pattern for row in present)),
                "positives": int(y.sum()),
                "auroc": auroc.to_dict(),
                "ece": round(expected_calibration_error(y, p[scored]), 4),
            }
        return table


def base_strategy(key: str) -> str:
    """The strategy of a cross-validation key (``hybrid``, ``hybrid-without-notes``, ``hybrid@image+labs``)."""
    return key.split("-without-")[0].split("@")[0]


def cross_validate(
    spec: FeatureSpec,
    table: TrainingTable,
    strategies: Sequence[Strategy],
    options: TrainOptions,
    folds: int = 5,
    ablate: bool = True,
    progress: Progress | None = None,
) -> CrossValidation:
    """Stratified k-fold: fit every strategy on k-1 folds, predict the held-out fold (with modality ablations)."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=options.seed)
    n = len(table)
    fold_of = np.zeros(n, dtype=int)
    keys = list(strategies)
    if ablate:
        keys += [f"{s}-without-{m}" for s in strategies if s in FUSION_STRATEGIES for m in MODALITIES]
        keys += [f"{s}@{p}" for s in strategies for p in all_patterns()]
    logits = {k: np.full(n, np.nan) for k in keys}
    probabilities = {k: np.full(n, np.nan) for k in keys}
    raw = {k: np.full(n, np.nan) for k in keys}
    attention = {k: np.zeros((n, 3)) for k in keys}
    thresholds: dict[str, list[float]] = {s: [] for s in strategies}
    for fold, (train_index, test_index) in enumerate(splitter.split(np.zeros(n), table.labels)):
        fold_of[test_index] = fold
        fold_options = TrainOptions(**{**options.to_dict(), "seed": options.seed + 1000 * (fold + 1)})

        def step(stage: str, done: int, total: int, fold: int = fold) -> None:
            if progress:
                progress(f"fold {fold + 1}/{folds} {stage}", done, total)

        fitted = fit_strategies(spec, table.subset(train_index), strategies, fold_options, progress=step)
        test = table.subset(test_index)
        # every strategy of a fold shares one frozen image encoder: encode the test images once
        encoders = [m.network for m in fitted.values() if m.network.image_encoder is not None]
        test_embeddings = image_embeddings(encoders[0], test) if encoders else None
        for strategy, model in fitted.items():
            thresholds[strategy].append(model.threshold)
            variants: list[tuple[str, str | None, tuple[str, ...] | None]] = [(strategy, None, None)]
            if ablate and strategy in FUSION_STRATEGIES:
                variants += [(f"{strategy}-without-{m}", m, None) for m in MODALITIES]
            if ablate:
                variants += [(f"{strategy}@{p}", None, tuple(p.split("+"))) for p in all_patterns()]
            for key, drop, keep in variants:
                z, weights, scored = predict(model.network, test, drop=drop, keep=keep, embeddings=test_embeddings)
                if keep is not None:  # a pattern is validated on the patients who have at least its modalities
                    scored &= test.present[:, [m in keep for m in MODALITIES]].all(axis=1)
                rows = test_index[scored]
                logits[key][rows] = z[scored]
                probabilities[key][rows] = model.probabilities(z[scored])
                raw[key][rows] = 1.0 / (1.0 + np.exp(-z[scored]))
                attention[key][rows] = weights[scored]
    return CrossValidation(table.labels, fold_of, logits, probabilities, raw, thresholds, attention)


def train_package(
    spec: FeatureSpec,
    table: TrainingTable,
    out_dir: Path,
    strategy: Strategy = "hybrid",
    options: TrainOptions | None = None,
    folds: int = 5,
    name: str = "chest-ct-fusion",
    version: str = "0.1.0",
    progress: Progress | None = None,
) -> tuple[str, dict[str, Any]]:
    """Cross-validate ``strategy`` (``folds`` >= 2; 0 skips it), fit it on the whole table, write the package.

    Returns ``(sha256, metrics)``. The model card says "not for clinical use" when the table is synthetic.
    """
    options = options or TrainOptions()
    metrics: dict[str, Any] = {}
    if folds:
        cv = cross_validate(spec, table, [strategy], options, folds, progress=progress)
        block = cv.metrics(strategy, options.bootstrap, options.seed)
        block["description"] = f"pooled out-of-fold predictions, {folds}-fold stratified, bootstrap 95% CI"
        block["ablation_auroc"] = {
            key.split("-without-")[1]: cv.metrics(key, options.bootstrap, options.seed)["metrics"]["auroc"]
            for key in cv.probabilities
            if "-without-" in key
        }
        metrics["cross_validation"] = block
        metrics["patterns"] = {
            "description": f"{folds}-fold out-of-fold predictions with each test patient's inputs reduced to the "
            "pattern (n: patients with at least its modalities; natural_n: with exactly them); AUROC with "
            "bootstrap 95% CI, ECE with 10 equal-width bins",
            "table": cv.patterns(strategy, table.present, options.bootstrap, options.seed),
        }
    fitted = fit_strategies(spec, table, [strategy], options, name=name, version=version, progress=progress)[strategy]
    calibrated = fitted.probabilities(fitted.calibration_logits)
    estimates = bootstrap_metrics(
        fitted.calibration_labels, calibrated, fitted.threshold, options.bootstrap, options.seed
    )
    raw = 1.0 / (1.0 + np.exp(-fitted.calibration_logits))
    metrics["calibration_split"] = {
        "description": "the final model's own calibration split (also used to fit calibration: optimistic)",
        "n": len(fitted.calibration_labels),
        "metrics": {k: v.to_dict() for k, v in estimates.items()},
        "ece_uncalibrated": round(expected_calibration_error(fitted.calibration_labels, raw), 4),
    }
    source = table.manifest.get("source", {})
    metrics["threshold"] = round(fitted.threshold, 4)
    metrics["training"] = {
        "synthetic": source.get("kind") == "synthetic",
        "source": ", ".join(f"{k}={v}" for k, v in sorted(source.items())),
        "rows": len(table),
        "positives": int(table.labels.sum()),
        "with_image": int(table.present[:, 0].sum()),
        "with_labs": int(table.present[:, 1].sum()),
        "with_notes": int(table.present[:, 2].sum()),
        "feature_spec": spec.label,
        "options": options.to_dict(),
        "history": fitted.history,
    }
    sha256 = save_package(out_dir, fitted.network.config, fitted.network, fitted.calibrator, metrics)
    return sha256, metrics
