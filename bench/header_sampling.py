"""Header sampling benchmark: what reading one instance's header per series costs a study's selection.

On the sandbox PACS (started if needed) with a synthetic cohort loaded, every study's series are selected
(:func:`riskbridge.stages.select.select_study`, the path the nightly run takes), in the same run:

- on Orthanc, ``C-FIND only`` (``header_sampling = off``): SERIES-level C-FIND plus IMAGE-level completion, the
  reference; ``when-needed`` (on Orthanc nothing is missing, so it should cost nothing); ``always`` (one sampled
  header per candidate series): what sampling costs per study on the same PACS;
- on dcmtk's dcmqrscp (a strict PACS: no ImageType, SliceThickness, ... at any C-FIND level), ``C-FIND only``
  (which chooses no series) and ``when-needed`` (which must).

Staging is emptied before each way, so every sample is fetched over the network (C-GET). Seconds per study
(median and total), series sampled and studies with a chosen series are printed and written to
docs/benchmarks.md. Usage::

    .venv/bin/python bench/header_sampling.py [--patients 12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section

from riskbridge.connectors.sampling import HeaderSampler, SamplingMode
from riskbridge.dev.sandbox import Sandbox, dcmqrscp_pacs
from riskbridge.dev.synth import LoadReport, generate, read_truth
from riskbridge.dev.synth.load import load_dicom, load_dicom_into
from riskbridge.harmonize.series import load_default_rules
from riskbridge.settings import PacsSettings, load_settings
from riskbridge.stages.select import select_study

console = Console(width=160)
WAYS: tuple[tuple[str, SamplingMode], ...] = (
    ("C-FIND only", "off"),
    ("when-needed", "when-needed"),
    ("always", "always"),
)


def measure(pacs: PacsSettings, studies: list[str], mode: SamplingMode, staging: Path) -> tuple[list[float], int, int]:
    """Seconds of each study's selection, the series sampled and the studies with a chosen series, from an empty
    staging area."""
    shutil.rmtree(staging, ignore_errors=True)
    rules = load_default_rules("chest_ct")
    seconds, chosen = [], 0
    with HeaderSampler(pacs, staging, mode) as sampler:
        for study_uid in studies:
            started = time.perf_counter()
            study = select_study(pacs, study_uid, rules, sampler)
            seconds.append(time.perf_counter() - started)
            chosen += study.selection.chosen is not None
        return seconds, sampler.stats.series, chosen


def main() -> None:
    """Run the benchmark and write its section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    settings = load_settings()
    Sandbox(settings).up(only=["orthanc", "dcmqrscp"])
    work = Path(tempfile.mkdtemp(prefix="rb-bench-sampling-"))
    cohort = work / "cohort"
    generate(cohort, patients=args.patients, seed=911)
    manifest_id = read_truth(cohort)[0]["cohort_id"]
    load_dicom(cohort, f"http://127.0.0.1:{settings.sandbox.orthanc_http_port}", LoadReport(manifest_id))
    strict = dcmqrscp_pacs(settings)
    load_dicom_into(strict, cohort)
    studies = [record["index_study"]["study_uid"] for record in read_truth(cohort)]
    orthanc = settings.pacs.model_copy(update={"dicomweb_url": None, "transport": "c-get"})
    strict = strict.model_copy(update={"transport": "c-get"})
    ways = [("Orthanc", orthanc, name, mode) for name, mode in WAYS]
    ways += [("dcmqrscp", strict, "C-FIND only", "off"), ("dcmqrscp", strict, "when-needed", "when-needed")]
    measure(orthanc, studies, "off", work / "staging")  # warm both PACS before the first measured way
    measure(strict, studies, "off", work / "staging")
    header = ["PACS", "way", "studies", "chosen", "series sampled", "median s/study", "total s", "vs C-FIND only"]
    table = Table(*header)
    rows = []
    reference: dict[str, float] = {}
    for pacs_name, pacs, name, mode in ways:
        runs = [measure(pacs, studies, mode, work / "staging") for _ in range(args.repeat)]
        seconds, sampled, chosen = min(runs, key=lambda run: sum(run[0]))
        reference.setdefault(pacs_name, sum(seconds))
        row = [
            pacs_name, name, str(len(seconds)), str(chosen), str(sampled), f"{statistics.median(seconds):.3f}",
            f"{sum(seconds):.2f}", f"{sum(seconds) / reference[pacs_name]:.2f}x",
        ]  # fmt: skip
        table.add_row(*row)
        rows.append(row)
    console.print(table)
    body = (
        f"Selection of the {len(studies)} CT studies of a synthetic cohort (localizer, thin and thick axial, coronal "
        "reformat, and a dose report in about half) on the sandbox PACS over DIMSE, C-GET for the samples, best of "
        f"{args.repeat} per way, staging emptied before each (every sample crosses the network). `chosen`: studies "
        "with a series chosen by the chest CT rules. dcmqrscp rereads its index file for every query and store, so "
        "its C-FIND-only path is already slower than Orthanc's.\n\n" + markdown_table(header, rows)
    )
    path = write_section("header-sampling", "Header sampling: cost per study against the C-FIND-only path", body)
    console.print(f"written to {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
