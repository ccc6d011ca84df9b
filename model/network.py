"""The fusion network: a MONAI 3D image encoder, tabular encoders and five ways to fuse them (docs/model.md).

Modalities come in the fixed order :data:`MODALITIES` (image, labs, notes). The labs input is the feature spec's labs
and demographics followed by their missingness mask; the notes input is the note flags followed by theirs; raw
values in canonical units go in, and the network standardizes them with the statistics stored in its
:class:`ModelConfig` (so a scorer never has to). ``present[B, 3]`` says which modalities a patient has.

Strategies (:data:`STRATEGIES`):

* ``image``: image encoder -> head. ``tabular``: one MLP over labs and notes inputs -> head.
* ``early``: image embedding concatenated with the raw tabular inputs and the presence flags -> one MLP.
* ``late``: one head per modality, the output probability is the mean of the present modalities' probabilities.
* ``hybrid``: attention fusion, ``alpha_i = softmax_i(w^T tanh(Z_i))`` over the present modalities only (absent
  ones are masked to -inf, never zero-filled), ``Z = sum_i alpha_i Z_i``, linear head (sigmoid outside).

Modality dropout (``early`` and ``hybrid``) removes each present modality with probability
``ModelConfig.modality_dropout`` in training mode only, never all of a patient's modalities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import torch
from monai.networks.nets import ResNet, UNet
from scipy import ndimage
from torch import Tensor, nn

from riskbridge.model.preprocess import PreprocessConfig
from riskbridge.records import MODALITIES

IMAGE_ENCODERS = ("resnet", "detector")
# What the detector encoder reads off its nodule probability map, per volume (see burden_features).
BURDEN_FEATURES = ("burden", "count", "volume", "largest", "peak")
Strategy = Literal["image", "tabular", "early", "late", "hybrid"]
STRATEGIES: tuple[Strategy, ...] = ("image", "tabular", "early", "late", "hybrid")
# Which modalities each strategy reads; the others are ignored (and get zero attention).
STRATEGY_MODALITIES: dict[str, tuple[bool, bool, bool]] = {
    "image": (True, False, False),
    "tabular": (False, True, True),
    "early": (True, True, True),
    "late": (True, True, True),
    "hybrid": (True, True, True),
}
CONFIG_FORMAT = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network and feed it: strategy, feature layout, preprocessing, sizes.

    ``lab_center``/``lab_scale``/``lab_log`` standardize the labs modality's values (``log`` first where set);
    they are fitted on the training split by :func:`riskbridge.model.fitting.fit_tabular_scaling`.
    """

    name: str
    version: str
    strategy: Strategy
    feature_spec: str
    lab_features: tuple[str, ...]
    note_features: tuple[str, ...]
    preprocess: PreprocessConfig
    embed_dim: int = 32
    hidden_dim: int = 64
    image_channels: tuple[int, int, int, int] = (8, 16, 32, 64)
    image_pool: Literal["max", "avg"] = "max"
    image_encoder: Literal["resnet", "detector"] = "resnet"
    detector_channels: tuple[int, ...] = (16, 32, 64)
    detector_threshold: float = 0.5
    dropout: float = 0.1
    modality_dropout: float = 0.25
    lab_center: tuple[float, ...] = ()
    lab_scale: tuple[float, ...] = ()
    lab_log: tuple[bool, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        n = len(self.lab_features)
        for name in ("lab_center", "lab_scale", "lab_log"):
            if getattr(self, name) and len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {n} lab features")
        if any(not (math.isfinite(s) and s > 0) for s in self.lab_scale):
            raise ValueError("lab_scale values must be finite and positive")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must lie in [0, 1), got {self.modality_dropout}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {', '.join(IMAGE_ENCODERS)}, got {self.image_encoder!r}")
        if self.image_encoder == "detector":
            # the U-Net halves the grid len(channels) - 1 times and must meet its skip connections again
            factor = 2 ** (len(self.detector_channels) - 1)
            if len(self.detector_channels) < 2 or any(side % factor for side in self.preprocess.size):
                raise ValueError(
                    f"the detector encoder needs at least 2 channel levels and a preprocess size divisible by "
                    f"{factor}, got channels {self.detector_channels} and size {self.preprocess.size}"
                )
            if not 0.0 < self.detector_threshold < 1.0:
                raise ValueError(f"detector_threshold must lie in (0, 1), got {self.detector_threshold}")

    @property
    def uses(self) -> tuple[bool, bool, bool]:
        """Which of (image, labs, notes) this strategy reads."""
        return STRATEGY_MODALITIES[self.strategy]

    def with_strategy(self, strategy: Strategy) -> ModelConfig:
        """The same config for another strategy."""
        return replace(self, strategy=strategy)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the package's config.json)."""
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        data["format"] = CONFIG_FORMAT
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict`'s output; ValueError on a different format or unknown keys."""
        data = dict(data)
        if data.pop("format", None) != CONFIG_FORMAT:
            raise ValueError(f"model config format must be {CONFIG_FORMAT}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown key(s): {', '.join(unknown)}")
        data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        for key in (
            "lab_features",
            "note_features",
            "image_channels",
            "detector_channels",
            "lab_center",
            "lab_scale",
            "lab_log",
        ):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class FusionOutput(NamedTuple):
    """Network output: ``logits [B]``, ``attention [B, 3]`` (0 for absent or unused modalities, rows sum to 1) and
    ``unimodal_logits [B, 3]`` (the ``late`` strategy's per-modality logits; ``None`` otherwise)."""

    logits: Tensor
    attention: Tensor
    unimodal_logits: Tensor | None = None


def image_encoder(config: ModelConfig) -> nn.Module:
    """The image encoder ``config.image_encoder`` names: :class:`NoduleBurdenEncoder` or :func:`resnet_encoder`."""
    if config.image_encoder == "detector":
        return NoduleBurdenEncoder(config)
    return resnet_encoder(config)


def resnet_encoder(config: ModelConfig) -> nn.Module:
    """A compact MONAI 3D ResNet (one basic block per stage, stride-2 stem, no max-pool) -> ``embed_dim`` features.

    With ``image_pool="max"`` the final global pooling is a max instead of MONAI's average: a nodule fills a few
    voxels of the volume, and an average over the whole chest drowns its response (the image stage then learns
    nothing from outcome labels, as measured in docs/model.md).
    """
    network = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=list(config.image_channels),
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=3,
        conv1_t_stride=2,
        no_max_pool=True,
        num_classes=config.embed_dim,
    )
    if config.image_pool == "max":
        network.avgpool = nn.AdaptiveMaxPool3d(1)  # type: ignore[assignment]  # MONAI annotates only avg pools
    return network


def burden_features(logits: Tensor, spacing_mm: tuple[float, float, float], threshold: float) -> Tensor:
    """Per volume, what a radiologist would count, read off a nodule logit map ``[B, 1, X, Y, Z]`` -> ``[B, 5]``.

    Voxels with probability >= ``threshold`` form nodules (26-connected components); each nodule's diameter is
    that of the sphere of its volume. The features (:data:`BURDEN_FEATURES`): ``ln(1 + sum of diameters / 5 mm)``
    (the nodule burden), ``ln(1 + nodules)``, ``ln(1 + soft volume / 100 mm³)`` (the probability mass, which
    needs no threshold), the largest diameter in cm and the peak probability. They survive a single positive voxel
    where a global average over the chest would not (docs/model.md).
    """
    probability = torch.sigmoid(logits.detach().float())[:, 0].cpu().numpy()
    voxel_mm3 = float(np.prod(spacing_mm))
    structure = np.ones((3, 3, 3), dtype=bool)
    rows = []
    for volume in probability:
        labels, count = ndimage.label(volume >= threshold, structure=structure)
        sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0)
        diameters = np.cbrt(6.0 * sizes * voxel_mm3 / math.pi)
        rows.append(
            [
                math.log1p(float(diameters.sum()) / 5.0),
                math.log1p(count),
                math.log1p(float(volume.sum()) * voxel_mm3 / 100.0),
                float(diameters.max()) / 10.0 if count else 0.0,
                float(volume.max()),
            ]
        )
    return torch.tensor(rows, dtype=torch.float32, device=logits.device)


class NoduleBurdenEncoder(nn.Module):
    """A MONAI U-Net that segments nodules, its burden read-out, and a linear map to the fusion's embedding.

    The U-Net (:attr:`segmenter`) is trained with dense, training-only nodule masks (riskbridge.model.dense); at
    scoring time it sees the image only. :meth:`burden` turns its nodule map into :data:`BURDEN_FEATURES` (no
    gradient: counting components is not differentiable, and the U-Net is trained by its own loss), and
    :attr:`readout` maps those to ``embed_dim`` features, trained on the outcome labels in the image stage.
    """

    def __init__(self, config: ModelConfig) -> None:
        """Build the U-Net (``detector_channels``, one residual unit per level) and the read-out."""
        super().__init__()
        channels = tuple(config.detector_channels)
        self.segmenter = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
        )
        self.readout = nn.Linear(len(BURDEN_FEATURES), config.embed_dim)
        self.spacing_mm = config.preprocess.spacing_mm
        self.threshold = config.detector_threshold

    def segment(self, image: Tensor) -> Tensor:
        """Nodule logits ``[B, 1, *size]`` of preprocessed volumes ``[B, 1, *size]``."""
        return cast(Tensor, self.segmenter(image))

    @torch.no_grad()
    def burden(self, image: Tensor) -> Tensor:
        """:func:`burden_features` of the volumes ``[B, 1, *size]`` -> ``[B, 5]``."""
        return burden_features(self.segment(image), self.spacing_mm, self.threshold)

    def embed(self, burden: Tensor) -> Tensor:
        """Embeddings ``[B, embed_dim]`` of burden features ``[B, 5]``."""
        return cast(Tensor, self.readout(burden))

    def forward(self, image: Tensor) -> Tensor:
        """Embeddings ``[B, embed_dim]`` of preprocessed volumes ``[B, 1, *size]``."""
        return self.embed(self.burden(image))


def mlp(inputs: int, hidden: int, outputs: int, dropout: float) -> nn.Sequential:
    """Two-layer perceptron with ReLU and dropout: the tabular encoders and the fusion heads."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, outputs))


def modality_dropout(present: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each present modality with probability ``rate``; a row never loses all of its present modalities.

    When every present modality of a row would be dropped, one of them (chosen at random) is kept.
    """
    if rate <= 0.0:
        return present
    keep = torch.rand(present.shape, generator=generator, device=present.device) >= rate
    kept = present & keep
    lost_all = present.any(dim=1) & ~kept.any(dim=1)
    if bool(lost_all.any()):
        scores = torch.rand(present.shape, generator=generator, device=present.device).masked_fill(~present, -1.0)
        rescue = torch.zeros_like(present)
        rescue[torch.arange(present.shape[0], device=present.device), scores.argmax(dim=1)] = True
        kept = kept | (rescue & lost_all[:, None])
    return kept


class FusionNet(nn.Module):
    """Image, labs and notes encoders fused by one of :data:`STRATEGIES` (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        """Build the layers ``config.strategy`` needs; the tabular standardization comes from the config."""
        super().__init__()
        self.config = config
        n_labs, n_notes = len(config.lab_features), len(config.note_features)
        e, h, d = config.embed_dim, config.hidden_dim, config.dropout
        center = config.lab_center or (0.0,) * n_labs
        scale = config.lab_scale or (1.0,) * n_labs
        log = config.lab_log or (False,) * n_labs
        self.register_buffer("lab_center", torch.tensor(center, dtype=torch.float32))
        self.register_buffer("lab_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("lab_log", torch.tensor(log, dtype=torch.bool))
        strategy = config.strategy
        self.image_encoder = image_encoder(config) if config.uses[0] else None
        self.labs_encoder: nn.Module | None = None
        self.notes_encoder: nn.Module | None = None
        self.heads = nn.ModuleDict()
        if strategy == "image":
            self.heads["out"] = nn.Sequential(nn.ReLU(), nn.Linear(e, 1))
        elif strategy == "tabular":
            self.heads["out"] = mlp(2 * n_labs + 2 * n_notes, h, 1, d)
        elif strategy == "early":
            self.heads["out"] = mlp(e + 2 * n_labs + 2 * n_notes + 3, h, 1, d)
        else:
            self.labs_encoder = mlp(2 * n_labs, h, e, d)
            self.notes_encoder = mlp(2 * n_notes, h, e, d)
            if strategy == "late":
                for modality in MODALITIES:
                    self.heads[modality] = nn.Sequential(nn.ReLU(), nn.Linear(e, 1))
            else:
                self.attention = nn.Linear(e, 1, bias=False)
                self.heads["out"] = nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Dropout(d), nn.Linear(h, 1))

    def standardize_labs(self, labs: Tensor) -> Tensor:
        """Labs input ``[values, mask]`` with the values standardized (log first where configured)."""
        n = len(self.config.lab_features)
        values, mask = labs[:, :n], labs[:, n:]
        lab_log = cast(Tensor, self.lab_log)
        values = torch.where(lab_log, torch.log(values.clamp_min(1e-6)), values)
        values = (values - cast(Tensor, self.lab_center)) / cast(Tensor, self.lab_scale)
        return torch.cat([values.clamp(-8.0, 8.0), mask], dim=1)

    def encode_image(self, image: Tensor) -> Tensor:
        """Image embeddings ``[B, embed_dim]`` for a batch of preprocessed volumes ``[B, 1, *size]``."""
        if self.image_encoder is None:
            raise ValueError(f"strategy {self.config.strategy!r} has no image encoder")
        return cast(Tensor, self.image_encoder(image))

    def forward(
        self,
        image: Tensor | None,
        labs: Tensor,
        notes: Tensor,
        present: Tensor,
        *,
        image_embedding: Tensor | None = None,
    ) -> FusionOutput:
        """Fuse one batch; ``image`` may be None when no row has one (``present[:, 0]`` all False).

        ``image_embedding`` replaces ``image`` with precomputed :meth:`encode_image` output (training with a frozen
        encoder). Rows whose image is absent may hold anything: they are never read. A row with none of the
        strategy's modalities present is a ValueError (nothing to score it on).
        """
        present = present.to(torch.bool)
        uses = torch.tensor(self.config.uses, device=present.device)
        present = present & uses
        if self.training and self.config.strategy in ("early", "hybrid"):
            present = modality_dropout(present, self.config.modality_dropout)
        empty = ~present.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()[:5]
            raise ValueError(f"rows {rows} have none of the modalities strategy {self.config.strategy!r} reads")
        batch = present.shape[0]
        z_image = self._image_embedding(image, image_embedding, present, batch)
        labs_in = self.standardize_labs(labs)
        strategy = self.config.strategy
        if strategy == "image":
            return FusionOutput(self.heads["out"](z_image).squeeze(1), _uniform(present))
        if strategy == "tabular":
            logits = self.heads["out"](torch.cat([labs_in, notes], dim=1)).squeeze(1)
            return FusionOutput(logits, _uniform(present))
        if strategy == "early":
            # early fusion zero-fills what is absent (its defining weakness); the flags say which
            absent_image = z_image * present[:, :1]
            inputs = torch.cat([absent_image, labs_in * present[:, 1:2], notes * present[:, 2:3], present.float()], 1)
            return FusionOutput(self.heads["out"](inputs).squeeze(1), _uniform(present))
        assert self.labs_encoder is not None and self.notes_encoder is not None
        embeddings = torch.stack([z_image, self.labs_encoder(labs_in), self.notes_encoder(notes)], dim=1)
        if strategy == "late":
            unimodal = torch.cat([self.heads[m](embeddings[:, i]) for i, m in enumerate(MODALITIES)], dim=1)
            weights = _uniform(present)
            probability = (torch.sigmoid(unimodal) * weights).sum(dim=1).clamp(1e-6, 1.0 - 1e-6)
            return FusionOutput(torch.logit(probability), weights, unimodal)
        scores = self.attention(torch.tanh(embeddings)).squeeze(2)
        attention = torch.softmax(scores.masked_fill(~present, float("-inf")), dim=1)
        # absent embeddings are excluded, not zero-weighted garbage: where() keeps NaN/inf out of the sum
        fused = (attention.unsqueeze(2) * torch.where(present.unsqueeze(2), embeddings, 0.0)).sum(dim=1)
        return FusionOutput(self.heads["out"](fused).squeeze(1), attention)

    def _image_embedding(self, image: Tensor | None, embedding: Tensor | None, present: Tensor, batch: int) -> Tensor:
        e = self.config.embed_dim
        if not self.config.uses[0]:
            return present.new_zeros((batch, e), dtype=torch.float32)
        if embedding is not None:
            return embedding
        if image is None:
            if bool(present[:, 0].any()):
                raise ValueError("present says some rows have an image, but no image tensor was given")
            return present.new_zeros((batch, e), dtype=torch.float32)
        return self.encode_image(image)

    def loss(self, output: FusionOutput, target: Tensor, present: Tensor) -> Tensor:
        """Training loss: BCE on the logits, or for ``late`` the mean BCE of each present modality's own head."""
        target = target.float()
        if self.config.strategy != "late":
            return nn.functional.binary_cross_entropy_with_logits(output.logits, target)
        assert output.unimodal_logits is not None
        mask = (present.to(torch.bool) & torch.tensor(self.config.uses, device=present.device)).float()
        per = nn.functional.binary_cross_entropy_with_logits(
            output.unimodal_logits, target[:, None].expand_as(output.unimodal_logits), reduction="none"
        )
        return (per * mask).sum() / mask.sum().clamp_min(1.0)


def _uniform(present: Tensor) -> Tensor:
    """Equal weights over the present modalities (the mixing weights of every strategy but ``hybrid``)."""
    weights = present.float()
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
