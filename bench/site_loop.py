"""Site training loop benchmark: a model trained on what the pipeline exports, against one trained on the truth.

What a site's own model is worth depends on what ``riskbridge cohort export`` gets out of its PACS and EHR. On the
sandbox (started if needed), two synthetic cohorts are loaded: a training cohort and a held-out cohort. Each is
exported through the pipeline by its accession numbers (C-FIND, identity matching, series selection, retrieval,
FHIR labs and notes, harmonize; labels from the outcomes recorded in HAPI FHIR by the shipped label spec) and also
built directly from the generator's truth (``riskbridge.dev.training_table``: what bench/fusion.py trains on; same
patients, the truth's own labs, flags and labels). The same training options fit a package on each training table,
and every package is judged on both held-out tables:

- **site loop**: trained on the exported table (resnet image encoder: an export has no dense nodule masks);
- **truth table, resnet**: the same patients from the truth, the same options (what the export loses, if anything);
- **truth table, detector** (``--detector``): bench/fusion.py's default encoder, trained on the truth's masks;
- **truth probability**: the generator's own probability (the Bayes ceiling of the labels).

AUROC with bootstrap 95% CIs on the held-out patients; the table goes to docs/benchmarks.md. Usage::

    .venv/bin/python bench/site_loop.py [--train 240] [--held-out 120] [--detector]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section
from _site import synthetic_site

from riskbridge.cohort import export_cohort, pseudonym
from riskbridge.dev.sandbox import Sandbox
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.dev.training_table import build_synthetic_table
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.model.data import TrainingTable, load_table
from riskbridge.model.fitting import predict
from riskbridge.model.metrics import Estimate, bootstrap_metrics
from riskbridge.model.package import load_package
from riskbridge.model.train import TrainOptions, train_package
from riskbridge.settings import (
    ExportSettings,
    load_settings,
)

console = Console(width=160)
TRAIN_SEED, HELD_OUT_SEED = 6060, 6161
SECRET = "bench-site-loop-secret-0123456789"


def evaluate(package: Path, table: TrainingTable) -> tuple[Estimate, int]:
    """AUROC (bootstrap 95% CI) of the package's calibrated probabilities on the table's rows it can score."""
    loaded = load_package(package)
    logits, _, scored = predict(loaded.build_network(), table)
    probabilities = loaded.calibrator.probabilities(logits[scored])
    labels = table.labels[scored]
    return bootstrap_metrics(labels, probabilities, loaded.threshold)["auroc"], int(scored.sum())


def agreement(site: TrainingTable, truth: TrainingTable, records: list[dict[str, object]]) -> list[str]:
    """How the exported table compares with the truth table of the same patients: rows in both, labels equal,
    tabular inputs equal, volumes' mean absolute difference (volumes scaled 0..1)."""
    secret = SECRET.encode()
    site_row = {key: i for i, key in enumerate(site.keys)}
    pairs = []
    for record in records:
        identity, study = record["identity"], record["index_study"]
        assert isinstance(identity, dict) and isinstance(study, dict)
        if not identity.get("fhir_patient_id") or record["patient_key"] not in truth.keys:
            continue
        key = pseudonym(secret, str(identity["fhir_patient_id"]), str(study["study_uid"]))
        if key in site_row:
            pairs.append((site_row[key], truth.keys.index(str(record["patient_key"]))))
    s_index, t_index = (np.array(column) for column in zip(*pairs, strict=True))
    labels = int((site.labels[s_index] == truth.labels[t_index]).sum())
    tabular = np.concatenate([site.labs[s_index] - truth.labs[t_index], site.notes[s_index] - truth.notes[t_index]], 1)
    equal = int((np.abs(tabular) < 1e-4).all(axis=1).sum())
    volume = float(np.abs(site.volumes[s_index].astype(np.float32) - truth.volumes[t_index].astype(np.float32)).mean())
    return [str(len(pairs)), f"{labels} of {len(pairs)}", f"{equal} of {len(pairs)}", f"{volume:.4f}"]


def main() -> None:
    """Run the benchmark and write its section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=240, help="Patients of the training cohort.")
    parser.add_argument("--held-out", type=int, default=120, help="Patients of the held-out cohort.")
    parser.add_argument("--detector", action="store_true", help="Also train the detector encoder on the truth.")
    parser.add_argument("--keep", type=Path, help="Keep the tables and packages in this directory.")
    args = parser.parse_args()
    base = load_settings()
    Sandbox(base).up(only=["orthanc", "hapi-fhir", "postgres"])
    work = args.keep or Path(tempfile.mkdtemp(prefix="rb-bench-loop-"))
    spec = load_default_feature_spec()
    seconds: dict[str, float] = {}
    tables: dict[str, TrainingTable] = {}
    agreements: list[list[str]] = []
    truth_auroc: Estimate | None = None
    with synthetic_site(base, work, "rb_bench_loop") as site:
        settings = site.model_copy(
            update={"export": ExportSettings(pseudonym_secret=SECRET, bulk_max_poll_interval_s=2.0)}
        )
        for role, seed, patients in (("train", TRAIN_SEED, args.train), ("held-out", HELD_OUT_SEED, args.held_out)):
            began = time.perf_counter()
            cohort = work / f"cohort-{role}"
            shutil.rmtree(cohort, ignore_errors=True)
            generate(cohort, patients=patients, seed=seed)
            load(cohort, f"http://127.0.0.1:{base.sandbox.orthanc_http_port}", base.fhir.base_url)
            seconds[f"{role}: generate + load"] = time.perf_counter() - began
            truth = read_truth(cohort)
            began = time.perf_counter()
            accessions = [r["index_study"]["accession"] for r in truth]
            export_cohort(settings, None, work / f"site-{role}", f"bench:loop:{role}", accessions=accessions)
            seconds[f"{role}: cohort export"] = time.perf_counter() - began
            began = time.perf_counter()
            build_synthetic_table(work / f"truth-{role}", spec, patients=patients, seed=seed, workers=2)
            seconds[f"{role}: truth table"] = time.perf_counter() - began
            tables[f"site-{role}"] = load_table(work / f"site-{role}", spec)
            tables[f"truth-{role}"] = load_table(work / f"truth-{role}", spec)
            agreements.append([role, *agreement(tables[f"site-{role}"], tables[f"truth-{role}"], truth)])
            if role == "held-out":
                by_key = {r["patient_key"]: r for r in truth}
                keys = tables["truth-held-out"].keys
                labels = np.array([by_key[k]["outcome"]["label"] for k in keys])
                probability = np.array([by_key[k]["outcome"]["probability"] for k in keys])
                truth_auroc = bootstrap_metrics(labels, probability, 0.5)["auroc"]

    options = TrainOptions(image_encoder="resnet", threads=2)
    variants = [("site loop (exported table, resnet)", "site-train", options)]
    variants.append(("truth table, resnet", "truth-train", options))
    if args.detector:
        variants.append(("truth table, detector", "truth-train", TrainOptions(image_encoder="detector", threads=2)))
    rows: list[list[str]] = []
    for label, source, chosen in variants:
        began = time.perf_counter()
        package = work / f"package-{len(rows)}"
        shutil.rmtree(package, ignore_errors=True)
        train_package(spec, tables[source], package, "hybrid", chosen, folds=0, version="0.0.0-bench")
        seconds[f"train: {label}"] = time.perf_counter() - began
        on_site, site_n = evaluate(package, tables["site-held-out"])
        on_truth, truth_n = evaluate(package, tables["truth-held-out"])
        trained_on = tables[source]
        rows.append([label, f"{len(trained_on)} ({int(trained_on.labels.sum())})", f"{on_site.text()} (n={site_n})",
                     f"{on_truth.text()} (n={truth_n})"])  # fmt: skip
        console.print(rows[-1])
    assert truth_auroc is not None
    rows.append(["truth probability (Bayes ceiling)", "-", "-", f"{truth_auroc.text()}"])
    header = ["model", "training rows (positives)", "AUROC on exported held-out", "AUROC on truth held-out"]
    console.print(markdown_table(header, rows))
    timing = markdown_table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in seconds.items()])
    body = (
        f"A {args.train}-patient training cohort and a {args.held_out}-patient held-out cohort of the synthetic "
        f"hospital (seeds {TRAIN_SEED}, {HELD_OUT_SEED}), loaded into the sandbox and exported through the pipeline "
        "by their accession numbers (`riskbridge cohort export --accessions`: labels from the outcomes in HAPI "
        "FHIR by the shipped label spec); the same patients' tables built from the generator's truth are what "
        "bench/fusion.py trains on. Hybrid fusion, default training options (6 image epochs, 40 fusion epochs), "
        "no cross-validation; each package judged on both held-out tables, AUROC with bootstrap 95% CI. Patients "
        "the pipeline quarantines (identity, no usable series) and patients without follow-up are not in the "
        "exported tables; the truth tables leave out only the identity and series quarantines.\n\n"
        + markdown_table(header, rows)
        + "\n\nThe exported tables against the truth tables of the same patients (rows matched through the "
        "pseudonym of each patient's FHIR id and study UID): labels, tabular inputs (labs, flags, age, sex and "
        "their observed masks) and volumes (mean absolute voxel difference, intensities scaled 0..1):\n\n"
        + markdown_table(["cohort", "rows in both", "labels equal", "tabular inputs equal", "volume MAD"], agreements)
        + "\n\nWall time of each step (2 CPUs):\n\n"
        + timing
    )
    path = write_section("site-loop", "Site training loop: a model from the pipeline's export vs the truth", body)
    console.print(f"written to {path}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
