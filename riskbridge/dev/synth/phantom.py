"""Chest CT phantom of the synthetic cohort: HU volumes for every series of a study (pure numpy, deterministic).

The anatomy (cohort.ANATOMY, scaled per patient) is an elliptical body of soft tissue (40 HU) inside a fat layer
(-100 HU) in air (-1000 HU), two lungs (about -850 HU, denser posteriorly) that narrow towards apex and base, a
heart and aorta (40 HU, 150-250 HU with IV contrast), a vertebral body and ribs (cancellous ~250 HU, cortical
~700 HU), a sternum, and the patient's lung nodules (spheres of ~30 HU with partial-volume edges). The thin
lung-kernel series is sharpened and noisier than the thin soft-kernel one; the thick series averages groups of
thin soft slices; the coronal reformat averages groups of soft-kernel rows; the localizer is an AP projection.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from riskbridge.dev.synth.cohort import ANATOMY, Nodule, StudySpec, lung_factor, rng_for

HU_MIN = -1024.0
HU_MAX = 3071.0
SOFT_NOISE_HU = 10.0
LUNG_NOISE_HU = 35.0


@dataclass
class StudyVolumes:
    """HU arrays of one study's series (float32; axial as (z, y, x), coronal as (y, z, x))."""

    thin_lung: np.ndarray
    thin_soft: np.ndarray
    thick_soft: np.ndarray
    coronal: np.ndarray
    coronal_y: np.ndarray
    localizer: np.ndarray


def _grid(study: StudySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = study.geometry
    xs = g.origin_xy + np.arange(g.matrix, dtype=np.float32) * g.pixel_mm
    zs = np.array([g.z_of(k) for k in range(g.n_thin)], dtype=np.float32)
    return xs, xs.copy(), zs


def _disk(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def anatomy_hu(study: StudySpec, nodules: list[Nodule]) -> np.ndarray:
    """Noise-free HU volume (z, y, x) of the study's thin grid, nodules included."""
    g = study.geometry
    s = g.body_scale
    a = ANATOMY
    xs, ys, zs = _grid(study)
    x2 = xs[None, :]
    y2 = ys[:, None]
    body_rx, body_ry = a["body_rx"] * s, a["body_ry"] * s
    outer = (x2 / body_rx) ** 2 + (y2 / body_ry) ** 2 <= 1.0
    inner = (x2 / (body_rx - a["fat_mm"])) ** 2 + (y2 / (body_ry - a["fat_mm"])) ** 2 <= 1.0
    base = np.full((g.matrix, g.matrix), -1000.0, dtype=np.float32)
    base[outer] = -100.0
    base[inner] = 40.0
    # Ribs: small cortical disks just inside the fat layer.
    for angle in np.linspace(0.0, 2.0 * math.pi, 14, endpoint=False):
        if math.sin(angle) < -0.75:  # none over the sternum
            continue
        rib_x = math.cos(angle) * (body_rx - a["fat_mm"] - 8.0)
        rib_y = math.sin(angle) * (body_ry - a["fat_mm"] - 8.0)
        base[_disk(x2, y2, rib_x, rib_y, a["rib_r"] * s)] = 700.0
    sternum = (np.abs(x2) <= 12.0 * s) & (np.abs(y2 - a["sternum_y"] * s) <= 5.0 * s)
    base[sternum] = 450.0
    spine = _disk(x2, y2, a["spine_x"], a["spine_y"] * s, a["spine_r"] * s)
    base[spine] = 700.0
    base[_disk(x2, y2, a["spine_x"], a["spine_y"] * s, (a["spine_r"] - 2.5) * s)] = 250.0
    base[_disk(x2, y2, a["spine_x"], a["canal_y"] * s, a["canal_r"] * s)] = 20.0
    blood = 180.0 if study.contrast else 40.0
    volume = np.repeat(base[None, :, :], g.n_thin, axis=0)
    # Lungs narrow towards apex and base; attenuation rises posteriorly (gravity-dependent).
    factors = np.array([lung_factor(float(z), g.lung_center_z) for z in zs], dtype=np.float32)[:, None, None]
    lung_hu = (-870.0 + 0.5 * (y2 - a["lung_y"] * s)).astype(np.float32)[None, :, :]
    for side in (-1.0, 1.0):
        cx, cy = side * a["lung_x"] * s, a["lung_y"] * s
        rx = np.maximum(a["lung_rx"] * s * factors, 1e-3)
        ry = np.maximum(a["lung_ry"] * s * factors, 1e-3)
        lung = ((x2[None] - cx) / rx) ** 2 + ((y2[None] - cy) / ry) ** 2 <= 1.0
        volume = np.where(lung, lung_hu, volume)
    heart = _disk(x2, y2, a["heart_x"] * s, a["heart_y"] * s, a["heart_r"] * s)
    volume[:, heart] = blood
    volume[:, _disk(x2, y2, a["aorta_x"] * s, a["aorta_y"] * s, a["aorta_r"] * s)] = blood + 70.0 * study.contrast
    for box, weight in _nodule_weights(study, nodules, xs, ys, zs):
        volume[box] = volume[box] * (1.0 - weight) + 30.0 * weight
    return volume.astype(np.float32)


def _nodule_weights(
    study: StudySpec, nodules: list[Nodule], xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """Each nodule's bounding box on the thin grid and its occupancy there (1 inside, partial volume at the edge)."""
    g = study.geometry
    scale = study.nodule_scale
    for nodule in nodules:
        x0, y0, dz = nodule.offset
        z0 = g.lung_center_z + dz
        radius = nodule.diameter_mm * scale / 2.0
        reach = radius + g.pixel_mm
        ix = np.nonzero(np.abs(xs - x0) <= reach)[0]
        iy = np.nonzero(np.abs(ys - y0) <= reach)[0]
        iz = np.nonzero(np.abs(zs - z0) <= reach)[0]
        if not (ix.size and iy.size and iz.size):
            continue  # outside this study's coverage (a prior scanned at another table position)
        box = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
        dist = np.sqrt(
            (xs[box[2]][None, None, :] - x0) ** 2
            + (ys[box[1]][None, :, None] - y0) ** 2
            + (zs[box[0]][:, None, None] - z0) ** 2
        )
        # Partial volume: full density within radius - half a voxel, fading linearly over one voxel.
        yield box, np.clip((radius - dist) / g.pixel_mm + 0.5, 0.0, 1.0).astype(np.float32)


def nodule_occupancy(study: StudySpec, nodules: list[Nodule]) -> np.ndarray:
    """The nodules' occupancy (0..1) on the study's thin grid ``(z, y, x)``: the dense label a radiologist's
    segmentation would give, for training only (the volumes of :func:`render_study` carry the same nodules)."""
    g = study.geometry
    xs, ys, zs = _grid(study)
    occupancy = np.zeros((g.n_thin, g.matrix, g.matrix), dtype=np.float32)
    for box, weight in _nodule_weights(study, nodules, xs, ys, zs):
        occupancy[box] = np.maximum(occupancy[box], weight)
    return occupancy


def _sharpen(volume: np.ndarray) -> np.ndarray:
    blurred = volume.copy()
    blurred[:, 1:-1, 1:-1] = (
        volume[:, :-2, 1:-1] + volume[:, 2:, 1:-1] + volume[:, 1:-1, :-2] + volume[:, 1:-1, 2:] + volume[:, 1:-1, 1:-1]
    ) / 5.0
    return volume + 0.6 * (volume - blurred)


def render_study(study: StudySpec, nodules: list[Nodule]) -> StudyVolumes:
    """HU arrays of every image series of ``study`` (noise seeded by the study, so the same bytes every run)."""
    g = study.geometry
    rng = rng_for(study.noise_seed, "noise")
    clean = anatomy_hu(study, nodules)
    thin_soft = clean + rng.normal(0.0, SOFT_NOISE_HU, clean.shape).astype(np.float32)
    thin_lung = _sharpen(clean) + rng.normal(0.0, LUNG_NOISE_HU, clean.shape).astype(np.float32)
    k = g.thick_group
    thick = thin_soft[: g.n_thick * k].reshape(g.n_thick, k, g.matrix, g.matrix).mean(axis=1)
    m = g.coronal_group
    start = max(0, g.matrix // 2 - (g.n_coronal * m) // 2)
    rows = thin_soft[:, start : start + g.n_coronal * m, :]
    coronal = rows.reshape(g.n_thin, g.n_coronal, m, g.matrix).mean(axis=2).transpose(1, 0, 2)
    ys = g.origin_xy + (start + np.arange(g.n_coronal) * m + (m - 1) / 2.0) * g.pixel_mm
    attenuation = np.clip(clean + 1000.0, 0.0, None).sum(axis=1) * g.pixel_mm
    localizer = np.clip(attenuation / max(float(attenuation.max()), 1.0) * 3000.0, 0.0, 4095.0)
    clip = (HU_MIN, HU_MAX)
    return StudyVolumes(
        thin_lung=np.clip(thin_lung, *clip),
        thin_soft=np.clip(thin_soft, *clip),
        thick_soft=np.clip(thick, *clip),
        coronal=np.clip(coronal, *clip),
        coronal_y=ys,
        localizer=localizer.astype(np.float32),
    )
