"""The synthetic cohort's training table: what trained the shipped reference model (format in docs/model.md).

:func:`build_synthetic_table` writes the table of a synthetic cohort (:mod:`riskbridge.dev.synth`) with
:class:`riskbridge.model.data.TableWriter`, without DICOM files: it renders each index study's thin lung-kernel
series with :mod:`riskbridge.dev.synth.phantom` and takes labs and note flags as the pipeline reproduces them (the
truth's windowed labs and note comorbidities, missing staying missing). Patients the truth quarantines (identity, no
usable series) are left out. Each row's dense nodule mask is rendered from the truth's nodules
(:func:`riskbridge.dev.synth.phantom.nodule_occupancy`) and its ``image_target`` is the truth's image term (the
nodule burden ``1.1 ln(1 + sum of diameters / 5) - 1.2``).

A development tool: the production model (:mod:`riskbridge.model`) reads training tables and never imports the
synthetic-data generator; ``riskbridge train`` builds a table here when it is given none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from riskbridge.dev.synth.cohort import (
    GENERATOR_VERSION,
    PatientSpec,
    build_cohort,
    expected_comorbidities,
    expected_labs,
    expected_quarantine,
)
from riskbridge.dev.synth.phantom import nodule_occupancy, render_study
from riskbridge.harmonize.features import FeatureSpec, build_vector
from riskbridge.model.data import DEFAULT_PREPROCESS, TableRow, TableWriter
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor

__all__ = ["DEFAULT_TRAINING_SEED", "build_synthetic_table", "synthetic_lung_volume", "synthetic_row"]

DEFAULT_TRAINING_SEED = 20240501  # not the demo cohort's seed: the reference model never saw the sandbox patients


def synthetic_lung_volume(patient: PatientSpec, preprocess: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed thin lung-kernel volume of a synthetic patient's index study (as its DICOM would give),
    and its dense nodule mask on the same grid.

    The phantom's array is ``(z, y, x)`` on the study's thin grid; the affine maps it to DICOM patient
    coordinates (LPS) exactly as the generated ImagePositionPatient/PixelSpacing do.
    """
    study = patient.index_study
    geometry = study.geometry
    hu = render_study(study, patient.nodules).thin_lung
    affine = np.array(
        [
            [0.0, 0.0, geometry.pixel_mm, geometry.origin_xy],
            [0.0, geometry.pixel_mm, 0.0, geometry.origin_xy],
            [-geometry.thin_mm, 0.0, 0.0, geometry.z_top],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    preprocessor = Preprocessor(preprocess)
    mask = preprocessor.mask_from_volume(nodule_occupancy(study, patient.nodules), affine, space="LPS")
    return preprocessor.from_volume(hu, affine, space="LPS"), mask


def synthetic_row(patient: PatientSpec, spec: FeatureSpec, preprocess: PreprocessConfig) -> TableRow:
    """A synthetic patient's table row: the truth's labs and note flags, age and sex, the rendered volume."""
    wanted = {lab.name for lab in spec.labs}
    labs = {name: (entry or {}).get("value") for name, entry in expected_labs(patient).items() if name in wanted}
    flags = expected_comorbidities(patient)
    if flags is not None:
        flags = {name: value for name, value in flags.items() if name in spec.flags}
    demographics = {"age_years": float(patient.age_years), "sex_male": 1.0 if patient.sex == "M" else 0.0}
    demographics = {k: v for k, v in demographics.items() if k in {d.name for d in spec.demographics}}
    vector = build_vector(spec, labs, flags, demographics)
    volume, mask = synthetic_lung_volume(patient, preprocess)
    # the truth's image term (nodule burden): optional auxiliary supervision of the image stage
    image_term = float(patient.logit_components["image"])
    return TableRow(patient.key, int(patient.label), vector, volume, image_term, mask)


def _rows_worker(args: tuple[Sequence[PatientSpec], FeatureSpec, PreprocessConfig]) -> list[TableRow]:
    patients, spec, preprocess = args
    import torch

    torch.set_num_threads(1)
    return [synthetic_row(patient, spec, preprocess) for patient in patients]


def _chunks(items: Sequence[PatientSpec], size: int) -> Iterator[Sequence[PatientSpec]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_synthetic_table(
    out_dir: Path,
    spec: FeatureSpec,
    patients: int = 3000,
    seed: int = DEFAULT_TRAINING_SEED,
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    size: str = "small",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the training table of the synthetic cohort ``(seed, patients, size)``; returns ``out_dir``.

    ``workers`` > 1 renders and preprocesses in that many processes (rows stay in patient order).
    """
    cohort = build_cohort(seed, patients, size)
    usable = [p for p in cohort.patients if expected_quarantine(p) is None]
    excluded = Counter(str(expected_quarantine(p)) for p in cohort.patients if expected_quarantine(p) is not None)
    source = {
        "kind": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "cohort_id": cohort.cohort_id,
        "seed": seed,
        "patients": patients,
        "size": size,
    }
    writer = TableWriter(out_dir, spec, preprocess, source)
    done = 0
    batches = [(chunk, spec, preprocess) for chunk in _chunks(usable, 16)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for rows in pool.map(_rows_worker, batches):
                for row in rows:
                    writer.add(row)
                done += len(rows)
                if progress:
                    progress(done, len(usable))
    else:
        for batch in batches:
            for patient in batch[0]:
                writer.add(synthetic_row(patient, spec, preprocess))
                done += 1
                if progress:
                    progress(done, len(usable))
    return writer.close(dict(excluded))
