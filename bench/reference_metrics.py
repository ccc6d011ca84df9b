"""Give the reference model package the cross-validation the fusion benchmark measured for its procedure.

The reference model is fitted with ``riskbridge train --folds 0`` on the benchmark's table; ``bench/fusion.py``
cross-validates the same procedure (same options and seeds: its hybrid fold models are the ones ``riskbridge train
--folds 3`` would fit), and the 2-core machine cannot afford the same cross-validation twice. This script copies the
benchmark's hybrid block (metrics with CIs, ablation AUROCs, validated patterns) into the package's metrics and
saves the package again, which re-checksums it.

    python bench/reference_metrics.py BENCH.json PACKAGE_DIR --folds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from riskbridge.model.package import load_package, save_package


def main() -> int:
    """Amend the package's metrics in place; print its new sha256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_json", type=Path, help="bench/fusion.py --json output")
    parser.add_argument("package", type=Path)
    parser.add_argument("--folds", type=int, default=3, help="the benchmark's folds (for the description)")
    args = parser.parse_args()

    bench = json.loads(args.bench_json.read_text())
    results = bench["results"]
    block = dict(results["hybrid"])
    block["description"] = (
        f"pooled out-of-fold predictions, {args.folds}-fold stratified, bootstrap 95% CI "
        "(bench/fusion.py, the same procedure and seeds)"
    )
    block["ablation_auroc"] = {
        key.split("-without-")[1]: value["metrics"]["auroc"]
        for key, value in results.items()
        if key.startswith("hybrid-without-")
    }
    package = load_package(args.package)
    metrics = dict(package.metrics)
    metrics.pop("calibration", None)  # save_package writes it from the calibrator
    metrics["cross_validation"] = block
    metrics["patterns"] = {
        "description": f"{args.folds}-fold out-of-fold predictions with each test patient's inputs reduced to the "
        "pattern (n: patients with at least its modalities; natural_n: with exactly them); AUROC with bootstrap "
        "95% CI, ECE with 10 equal-width bins (bench/fusion.py)",
        "table": bench["patterns"],
    }
    network = package.build_network()
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "package"
        sha256 = save_package(staged, package.config, network, package.calibrator, metrics)
        shutil.rmtree(args.package)
        shutil.copytree(staged, args.package)
    load_package(args.package, expected_sha256=sha256)
    print(f"{args.package}: sha256 {sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
