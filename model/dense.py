"""Dense supervision of the detector image encoder: its U-Net learns nodule masks, for training only.

One label per volume cannot teach a network to find 1-30 nodule voxels among ~200,000 (docs/model.md measured
that failure); a mask per volume can. :func:`train_segmenter` trains :class:`NoduleBurdenEncoder.segmenter` on
patches of the rows that carry a mask (half of them centred on a nodule voxel, MONAI's
``RandCropByPosNegLabeld``), with random left-right and cranio-caudal flips, MONAI's ``DiceCELoss`` and AdamW under
a one-cycle schedule. Rows without a mask take no part: an absent label is not "no nodule".

At scoring time the encoder sees the image only; :func:`burden_table` computes its burden features for a whole
training table once, so the image and fusion stages train on them without running the U-Net again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd
from torch import Tensor

from riskbridge.model.data import TrainingTable
from riskbridge.model.network import NoduleBurdenEncoder


@dataclass(frozen=True)
class DenseOptions:
    """How the segmenter is trained; the defaults converge on the synthetic cohort in ~8 minutes on 2 CPU cores."""

    iterations: int = 4000
    batch_size: int = 8
    patch_size: tuple[int, int, int] = (40, 40, 24)
    peak_learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    positive_fraction: float = 0.5


def patch_sampler(patch_size: tuple[int, int, int], positive_fraction: float, seed: int) -> Compose:
    """MONAI dictionary transforms: one patch per call (``positive_fraction`` centred on a label voxel), flipped."""
    keys = ("image", "label")
    sampler = Compose(
        [
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=patch_size,
                pos=positive_fraction,
                neg=1.0 - positive_fraction,
                num_samples=1,
            ),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),  # left-right
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),  # cranio-caudal
        ]
    )
    sampler.set_random_state(seed)
    return sampler


def fitted_patch_size(wanted: tuple[int, int, int], size: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """``wanted`` clipped to the volume ``size``, each side a multiple of ``factor`` (the U-Net's down-sampling)."""
    sides = [max(factor, (min(w, s) // factor) * factor) for w, s in zip(wanted, size, strict=True)]
    return sides[0], sides[1], sides[2]


def train_segmenter(
    encoder: NoduleBurdenEncoder,
    table: TrainingTable,
    options: DenseOptions,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``encoder.segmenter`` on the table's masked rows; returns the loss history (every 100 iterations).

    ValueError when no row has both an image and a mask: the detector encoder cannot learn without dense labels
    (train with ``image_encoder="resnet"`` then, or add labels: docs/model.md).
    """
    rows = table.mask_rows
    if rows.size == 0 or table.masks is None:
        raise ValueError("the detector image encoder needs dense nodule masks, and no row with an image has one")
    factor = 2 ** (len(encoder.segmenter.channels) - 1)
    patch = fitted_patch_size(options.patch_size, table.preprocess.size, factor)
    sampler = patch_sampler(patch, options.positive_fraction, seed)
    generator = np.random.default_rng(seed)
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(
        encoder.segmenter.parameters(), lr=options.peak_learning_rate, weight_decay=options.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.peak_learning_rate, total_steps=options.iterations
    )
    encoder.segmenter.train()
    history: list[dict[str, float]] = []
    running = 0.0
    for iteration in range(options.iterations):
        images, labels = _batch(table, rows[generator.integers(0, rows.size, options.batch_size)], sampler)
        loss = loss_function(encoder.segment(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        if (iteration + 1) % 100 == 0 or iteration + 1 == options.iterations:
            history.append({"iteration": iteration + 1, "loss": running / (iteration % 100 + 1)})
            running = 0.0
            if progress:
                progress(iteration + 1, options.iterations)
    encoder.segmenter.eval()
    return history


def _batch(table: TrainingTable, rows: np.ndarray, sampler: Compose) -> tuple[Tensor, Tensor]:
    """One patch of each of ``rows``: images float32 and labels float32, ``[B, 1, *patch]`` each."""
    assert table.masks is not None
    images, labels = [], []
    for row in rows:
        sample = {
            "image": torch.from_numpy(table.volumes[row].astype(np.float32)),
            "label": torch.from_numpy(table.masks[row].astype(np.float32)),
        }
        with warnings.catch_warnings():
            # a row whose radiologist found no nodule has no positive voxel: all its patches are negatives
            warnings.filterwarnings("ignore", message=".*unable to generate class balanced samples.*")
            patch = sampler(sample)[0]
        images.append(torch.as_tensor(patch["image"]))
        labels.append(torch.as_tensor(patch["label"]))
    return torch.stack(images), torch.stack(labels)


@torch.no_grad()
def burden_table(encoder: NoduleBurdenEncoder, table: TrainingTable, batch_size: int = 16) -> Tensor:
    """Burden features ``[N, 5]`` of every row (zeros where there is no image), the U-Net in eval mode."""
    encoder.eval()
    return table.encode_images(encoder.burden, encoder.readout.in_features, batch_size)
