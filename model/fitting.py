"""Fitting the fusion model: seeded splits, two-stage fitting and calibration of one or more strategies.

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

Cross-validation is :mod:`riskbridge.model.crossval`; the training entry point that writes a package is
:func:`riskbridge.model.train.train_package`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from riskbridge.harmonize.features import FeatureSpec
from riskbridge.model.calibration import Calibrator, Method, fit_calibrator
from riskbridge.model.data import TrainingTable
from riskbridge.model.dense import DenseOptions, burden_table, train_segmenter
from riskbridge.model.metrics import best_f1_threshold
from riskbridge.model.network import FusionNet, ModelConfig, NoduleBurdenEncoder, Strategy
from riskbridge.model.package import lab_feature_names
from riskbridge.records import MODALITIES

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


def fit_tabular_scaling(
    labs: np.ndarray, n_features: int
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[bool, ...]]:
    """Per labs-modality feature: ``(centers, scales, logs)`` from the observed training values.

    A feature is log-transformed when all its observed values are positive and skewed (99th percentile over
    three times the median); center is the median and scale the IQR / 1.349 (the standard deviation, or 1, when
    the IQR is zero).
    """
    centers: list[float] = []
    scales: list[float] = []
    logs: list[bool] = []
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
