"""Fusion benchmark: five strategies and a modality ablation on the synthetic cohort, with bootstrap 95% CIs.

Every strategy is cross-validated on the same stratified folds of the same training table (riskbridge.model.train
.cross_validate: per fold one image encoder, shared by the fusion strategies); the ablation removes the image, the
labs or the notes of every test patient at inference. References in the same run: the truth's own probability
(the Bayes ceiling any model can reach on these labels) and the truth's image term alone (what a perfect image
encoder could add). Results go to docs/model.md (section ``fusion``).

The image encoder is the detector (a MONAI U-Net trained on the table's dense nodule masks, training only) unless
``--image-encoder resnet``; a second reference, the truth's nodule burden read by a hand-made rule, is not used: the
truth image term is that rule's ceiling.

    python bench/fusion.py [--patients 3000] [--folds 3] [--dense-iterations 4000] [--table DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section

from riskbridge.dev.training_table import DEFAULT_TRAINING_SEED, build_synthetic_table
from riskbridge.harmonize.features import load_default_feature_spec
from riskbridge.model.data import load_table
from riskbridge.model.metrics import Estimate, bootstrap_metrics, paired_difference
from riskbridge.model.network import MODALITIES, STRATEGIES
from riskbridge.model.train import TrainOptions, cross_validate

DOC = Path(__file__).resolve().parent.parent / "docs" / "model.md"
LABELS = {
    "image": "image only",
    "tabular": "tabular only (labs + notes)",
    "early": "early fusion",
    "late": "late fusion",
    "hybrid": "hybrid attention fusion",
}


def _ci(block: dict[str, float]) -> str:
    return f"{block['value']:.3f} ({block['low']:.3f} to {block['high']:.3f})"


def main() -> int:
    """Run the benchmark and write docs/model.md's ``fusion`` section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=DEFAULT_TRAINING_SEED)
    parser.add_argument("--table", type=Path, default=Path(".riskbridge/bench-fusion-table"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="Epochs of the resnet image encoder.")
    parser.add_argument("--image-encoder", choices=("detector", "resnet"), default="detector")
    parser.add_argument("--dense-iterations", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fusion-epochs", type=int, default=40)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw results here.")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/model.md alone.")
    args = parser.parse_args()

    spec = load_default_feature_spec()
    started = time.perf_counter()
    if not (args.table / "manifest.json").is_file():
        build_synthetic_table(args.table, spec, patients=args.patients, seed=args.seed, workers=args.workers)
    table = load_table(args.table, spec)
    source = table.manifest["source"]
    if source.get("kind") != "synthetic":
        raise SystemExit("the fusion benchmark needs a synthetic table (its references come from the truth)")
    build_seconds = time.perf_counter() - started

    options = TrainOptions(
        image_epochs=args.epochs,
        fusion_epochs=args.fusion_epochs,
        bootstrap=args.bootstrap,
        seed=0,
        threads=args.threads,
        image_encoder=args.image_encoder,
        dense_iterations=args.dense_iterations,
    )
    started = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or (stage.endswith("segmenter") and done % 500 == 0):
            print(f"  {stage}: {done}/{total}, {time.perf_counter() - started:.0f} s", flush=True)

    cv = cross_validate(spec, table, list(STRATEGIES), options, folds=args.folds, progress=progress)
    train_seconds = time.perf_counter() - started

    # references from the truth of the same patients
    from riskbridge.dev.synth.cohort import build_cohort

    patients = {
        p.key: p for p in build_cohort(int(source["seed"]), int(source["patients"]), str(source["size"])).patients
    }
    truth_probability = np.array([patients[key].probability for key in table.keys])
    truth_image = np.array([patients[key].logit_components["image"] for key in table.keys])
    y = table.labels

    results: dict[str, dict[str, object]] = {}
    for key in cv.probabilities:
        results[key] = cv.metrics(key, args.bootstrap, 0)
    references = {
        "truth probability (Bayes ceiling)": bootstrap_metrics(y, truth_probability, 0.5, args.bootstrap, 0)["auroc"],
        "truth image term alone": bootstrap_metrics(y, 1 / (1 + np.exp(-truth_image)), 0.5, args.bootstrap, 0)["auroc"],
    }
    image_logits = cv.logits["image"]
    rho = float(spearmanr(image_logits, truth_image).statistic)

    rows = []
    for strategy in STRATEGIES:
        block = results[strategy]
        metrics = block["metrics"]
        assert isinstance(metrics, dict)
        rows.append(
            [LABELS[strategy]]
            + [_ci(metrics[name]) for name in ("auroc", "auprc", "f1", "brier", "ece")]
            + [f"{block['ece_uncalibrated']:.3f}"]
        )
    main_table = markdown_table(
        ["strategy", "AUROC", "AUPRC", "F1", "Brier", "ECE (calibrated)", "ECE (uncalibrated)"], rows
    )
    reference_rows = [[name, estimate.text()] for name, estimate in references.items()]
    reference_table = markdown_table(["reference (same patients, from the truth)", "AUROC (95% CI)"], reference_rows)

    comparisons = []
    hybrid = cv.probabilities["hybrid"]
    hybrid_auroc = results["hybrid"]["metrics"]
    assert isinstance(hybrid_auroc, dict)
    for other in ("image", "tabular", "early", "late"):
        p_other = cv.probabilities[other]
        both = np.isfinite(hybrid) & np.isfinite(p_other)
        delta = paired_difference(y[both], hybrid[both], p_other[both], "auroc", args.bootstrap, 0)
        other_metrics = results[other]["metrics"]
        assert isinstance(other_metrics, dict)
        overlap = not (
            hybrid_auroc["auroc"]["low"] > other_metrics["auroc"]["high"]
            or other_metrics["auroc"]["low"] > hybrid_auroc["auroc"]["high"]
        )
        comparisons.append(
            [
                f"hybrid - {LABELS[other]}",
                delta.text(),
                "overlap" if overlap else "no overlap",
                "yes" if delta.low > 0 else "no",
            ]
        )
    comparison_table = markdown_table(
        ["AUROC difference", "paired bootstrap (95% CI)", "marginal CIs", "hybrid better (CI > 0)"], comparisons
    )

    ablation_rows = []
    drops: dict[str, dict[str, Estimate]] = {}
    for strategy in ("early", "late", "hybrid"):
        full = cv.probabilities[strategy]
        cells = [LABELS[strategy], _ci(results[strategy]["metrics"]["auroc"])]  # type: ignore[index]
        drops[strategy] = {}
        for modality in MODALITIES:
            key = f"{strategy}-without-{modality}"
            ablated = cv.probabilities[key]
            both = np.isfinite(full) & np.isfinite(ablated)
            drop = paired_difference(y[both], full[both], ablated[both], "auroc", args.bootstrap, 0)
            drops[strategy][modality] = drop
            auroc = float(roc_auc_score(y[both], ablated[both]))
            cells.append(f"{auroc:.3f} (drop {drop.value:+.3f}, {drop.low:+.3f} to {drop.high:+.3f})")
        ablation_rows.append(cells)
    ablation_table = markdown_table(
        ["strategy", "all modalities"] + [f"without {m}" for m in MODALITIES], ablation_rows
    )

    attention = cv.attention["hybrid"].mean(axis=0)
    ece = results["hybrid"]["metrics"]["ece"]  # type: ignore[index]
    hybrid_auroc_value = hybrid_auroc["auroc"]["value"]
    image_auroc = results["image"]["metrics"]["auroc"]  # type: ignore[index]
    paired = {row[0]: row for row in comparisons}

    def paired_above_zero(other: str) -> list[str]:
        row = paired[f"hybrid - {LABELS[other]}"]
        return [
            f"paired difference hybrid - {LABELS[other]}: 95% CI above 0",
            "met" if row[3] == "yes" else "NOT met",
            row[1],
        ]

    without_image, without_notes = drops["hybrid"]["image"], drops["hybrid"]["notes"]
    targets = [
        ["image-only AUROC >= 0.62", "met" if image_auroc["value"] >= 0.62 else "NOT met", _ci(image_auroc)],
        ["Spearman(image logit, nodule burden) >= 0.5", "met" if rho >= 0.5 else "NOT met", f"{rho:.3f}"],
        ["hybrid AUROC >= 0.83", "met" if hybrid_auroc_value >= 0.83 else "NOT met", _ci(hybrid_auroc["auroc"])],
        paired_above_zero("tabular"),
        paired_above_zero("early"),
        paired_above_zero("late"),
        ["hybrid ECE < 0.05 (calibrated)", "met" if ece["value"] < 0.05 else "NOT met", _ci(ece)],
        [
            "AUROC drop without the image >= 0.03 (hybrid)",
            "met" if without_image.value >= 0.03 else "NOT met",
            without_image.text(),
        ],
        [
            "AUROC drop without notes <= 0.03 (hybrid)",
            "met" if without_notes.value <= 0.03 else "NOT met",
            without_notes.text(),
        ],
        [
            "fusion benchmark <= 60 min on the 2-core CPU",
            "met" if train_seconds <= 3600 else "NOT met",
            f"{train_seconds / 60:.1f} min (training and prediction, {args.threads} torch threads)",
        ],
    ]
    target_table = markdown_table(["target (issue 12)", "result", "figures"], targets)

    patterns = cv.patterns("hybrid", table.present, args.bootstrap, 0)
    pattern_rows = [
        [name, str(row["n"]), str(row["natural_n"]), _ci(row["auroc"]), f"{row['ece']:.3f}"]
        for name, row in patterns.items()
    ]
    pattern_table = markdown_table(
        ["pattern (hybrid)", "n validated", "n with exactly it", "AUROC (95% CI)", "ECE"], pattern_rows
    )

    n = len(table)
    if rho >= 0.5:
        learned = "the encoder learned most of the nodule burden"
    elif rho >= 0.2:
        learned = "the encoder learned part of the nodule burden, far from what the truth image term holds"
    else:
        learned = "the encoder learned next to nothing of the nodule burden"
    if args.image_encoder == "detector":
        image_stage = (
            f"Image encoder: detector (U-Net segmenter, {args.dense_iterations} batches of 8 patches on the dense "
            f"masks of the training folds; read-out {options.readout_epochs} epochs)"
        )
    else:
        image_stage = f"Image encoder: resnet, {args.epochs} epochs end to end"
    body = f"""
Synthetic cohort seed {source["seed"]}, {source["patients"]} patients ({source["size"]} images), of which {n} are
not quarantined ({int(y.sum())} positive, {y.mean():.1%}); with labs {int(table.present[:, 1].sum())}, with notes
{int(table.present[:, 2].sum())}, with an image {int(table.present[:, 0].sum())}. {args.folds}-fold stratified
cross-validation, pooled out-of-fold predictions, {args.bootstrap} bootstrap resamples (seed 0); ECE with 10
equal-width bins. Input {"x".join(map(str, table.preprocess.size))} voxels of
{"/".join(f"{v:g}" for v in table.preprocess.spacing_mm)} mm. {image_stage}; fusion stage {args.fusion_epochs}
epochs, calibration {options.calibration} on a 20% split of each training fold. Table build {build_seconds:.0f} s,
training and prediction {train_seconds:.0f} s ({train_seconds / 60:.1f} min) on {args.threads} torch threads.

{main_table}

{reference_table}

The image-only model's out-of-fold logit has Spearman rho {rho:.2f} with the truth's image term (the nodule
burden): {learned}.
Mean hybrid attention (image, labs, notes): {attention[0]:.2f}, {attention[1]:.2f}, {attention[2]:.2f}.

{comparison_table}

Modality ablation: the modality removed at inference for every test patient (masked out of the attention for
hybrid, dropped from the average for late, zero-filled with its presence flag off for early); AUROC and the paired
drop with its 95% CI.

{ablation_table}

Per missingness pattern (hybrid): each test patient's inputs reduced to the pattern, over the patients who have at
least its modalities (n validated); what the model package carries and the feature spec's policy reads.

{pattern_table}

{target_table}
"""
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "rho": rho, "patterns": patterns}, indent=2, default=str))
    if not args.no_write:
        write_section("fusion", "Fusion benchmark (bench/fusion.py)", body, report=DOC)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
