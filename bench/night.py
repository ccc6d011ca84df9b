"""Night benchmark: a synthetic hospital night at several sizes, end to end, against the physical floor of its work.

On the sandbox (Orthanc, HAPI FHIR, PostgreSQL; started if needed) one synthetic cohort of full-size chest CTs is
generated and loaded, without planted identity or series problems. For each size N (the first N index studies of
the cohort) the night is run:

- through ``riskbridge run``'s path (:class:`riskbridge.pipeline.Pipeline`: every stage in order, the run finished,
  its report written) with a ledger database of its own; the stage timings come from the ledger
  (``stage_timings``);
- through the real Airflow scheduler (api-server, scheduler and dag-processor, LocalExecutor, metadata on the
  sandbox PostgreSQL; ``bench/_airflow_scheduler.py``): the ``riskbridge_on_demand`` DAG over the same accessions,
  with a ledger of its own, its wall time from trigger to the DAG run's success;

and, in the same run, the physical floor of the same work, each part by the fastest plain way alone:

- PACS queries (discover, match's PACS side, select): a STUDY-level C-FIND per accession and a SERIES-level C-FIND
  per study with pynetdicom on one association;
- retrieval: the chosen series as raw WADO-RS streams (``transfer-syntax=*``, two at a time) written to disk;
- FHIR reads (match, clinical): the same resources as raw batched HTTP searches with ``requests``;
- scoring: the model's input work (read each staged series and preprocess it, no cache) and its forward passes on
  those inputs, timed alone;
- write-back: the RiskAssessments and Provenances the run wrote, posted again as raw transaction bundles of
  conditional creates (under another identifier system).

Overhead = the night's wall time - the sum of the floors: what riskbridge's own bookkeeping, ledger, checks and
orchestration add. Airflow's own cost = the Airflow night - the ``riskbridge run`` night. The wall time is fitted
against N (linear, and a power law for the exponent) and plotted. Results go to docs/benchmarks.md (section
``night``) and the plot to docs/img/night.png; ``--out DIR`` writes them there instead (the CI smoke does).

Usage::

    .venv/bin/python bench/night.py [--sizes 10,30,100] [--image-size full] [--no-airflow] [--out DIR]
    .venv/bin/python bench/night.py --smoke --out /tmp/night   # 2 and 4 small studies, no Airflow: a check only
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import requests
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPORT, markdown_table, write_section
from _site import synthetic_site

from riskbridge.connectors.dicomweb import WADO_ACCEPT
from riskbridge.dev.sandbox import Sandbox
from riskbridge.dev.synth import EdgeCaseRates, LoadReport, generate, load, read_truth
from riskbridge.dev.synth.load import load_fhir
from riskbridge.pipeline import Pipeline
from riskbridge.settings import Settings, load_settings
from riskbridge.stages import STAGE_NAMES

console = Console(width=180)
CLEAN = EdgeCaseRates(shared_mrn=0, no_fhir_patient=0, no_usable_series=0, pacs_missing_issuer=0)
FLOOR_PARTS = (
    "study queries", "patient lookups", "series queries", "retrieval bytes", "fhir reads", "model input",
    "model forward", "fhir writes",
)  # fmt: skip
# Which floor parts stand under which stage's wall time.
STAGE_FLOORS = {
    "discover": ("study queries",),
    "match": ("patient lookups",),
    "select": ("series queries",),
    "retrieve": ("retrieval bytes",),
    "clinical": ("fhir reads",),
    "harmonize": (),
    "score": ("model input", "model forward"),
    "write_back": ("fhir writes",),
}
PLOT = REPORT.parent / "img" / "night.png"
RESULTS = Path(".riskbridge/bench/night.json")  # every run's raw figures, for --render


@dataclass(frozen=True)
class Study:
    """One index study of the cohort: what the floor needs to do the same work as the pipeline."""

    accession: str
    study_uid: str
    series_uid: str
    fhir_patient_id: str
    mrn: str


@dataclass
class Night:
    """One night's figures: wall time, each stage's seconds from the ledger, counts, and (per arm) extras."""

    arm: str
    size: int
    wall_s: float
    stages: dict[str, float]
    done: dict[str, int]
    quarantined: int
    extra: dict[str, Any] = field(default_factory=dict)


# -- the cohort --------------------------------------------------------------------------------------------------------


def index_studies(cohort: Path) -> list[Study]:
    """The cohort's index studies with their chosen series, in patient order."""
    studies = []
    for record in read_truth(cohort):
        index = record["index_study"]
        patient = record["identity"]["fhir_patient_id"]
        if record["correct_series_uid"] and patient:
            studies.append(
                Study(index["accession"], index["study_uid"], record["correct_series_uid"], patient, record["mrn"])
            )
    return studies


def bytes_of(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- the two ways of running the night ---------------------------------------------------------------------------------


def ledger_stages(settings: Settings, run_id: int) -> tuple[dict[str, float], dict[str, int], int]:
    """Seconds and done counts per stage of the run, summed over chunks, and the studies it quarantined (a night
    of this clean cohort quarantines none: it fails here, naming the reasons, when it does)."""
    connection = psycopg2.connect(settings.database.dsn.get_secret_value())
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT stage, sum(seconds), sum(done), sum(quarantined) FROM stage_timings WHERE run_id = %s "
                "GROUP BY stage",
                (run_id,),
            )
            rows = cursor.fetchall()
            cursor.execute(
                "SELECT stage, reason, detail FROM quarantine WHERE run_id = %s ORDER BY study_uid", (run_id,)
            )
            quarantine = cursor.fetchall()
    finally:
        connection.close()
    if quarantine:
        raise RuntimeError(f"the night quarantined {len(quarantine)} studies of a clean cohort: {quarantine[:5]}")
    seconds = {stage: float(s) for stage, s, _, _ in rows}
    done = {stage: int(d) for stage, _, d, _ in rows}
    return seconds, done, sum(int(q) for _, _, _, q in rows)


def run_night(settings: Settings, studies: Sequence[Study], key: str, work: Path) -> Night:
    """The night as a data engineer runs it without Airflow: ``riskbridge run --accession ...`` in a process of its
    own (imports, progress, the run's report included), with ``settings`` as its environment."""
    from _airflow_scheduler import child_environment

    command = [str(Path(sys.executable).with_name("riskbridge")), "run", "--run-key", key]
    for study in studies:
        command += ["--accession", study.accession]
    env = child_environment(settings, work / "riskbridge-run.toml")
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"riskbridge run exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.ledger.run_by_key(key).run_id
    stages, counts, quarantined = ledger_stages(settings, run_id)
    return Night("riskbridge run", len(studies), wall, stages, counts, quarantined)


def airflow_night(settings: Settings, studies: Sequence[Study], work: Path, key: str) -> Night:
    """The night through the real Airflow scheduler (LocalExecutor): ``riskbridge_on_demand`` over the accessions,
    timed from the trigger to the DAG run's end (the scheduler is started and its DAG parsed before)."""
    from _airflow_scheduler import scheduled_airflow

    dag = "riskbridge_on_demand"
    # The dag-processor re-parses the DAG files every 30 s by default: on 2 cores that competes with the night.
    quiet = {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600"}
    with scheduled_airflow(settings, work, dag_ids=(dag,), airflow_config=quiet) as airflow:
        run = airflow.trigger(dag, {"accessions": [s.accession for s in studies]}, key)
        timing = airflow.wait(dag, run, timeout_s=7200)
    if timing.state != "success" or timing.wall_s is None:
        raise RuntimeError(f"the Airflow night ended {timing.state}")
    with Pipeline.from_settings(settings) as pipeline:
        run_id = pipeline.ledger.run_by_key(ledger_key_of(settings)).run_id
    stages, counts, quarantined = ledger_stages(settings, run_id)
    extra = {
        "task_s": timing.task_s,
        "queued_wait_s": timing.queued_wait_s,
        "critical_path_s": timing.critical_path_s,
        "scheduler_overhead_s": timing.scheduler_overhead_s,
        "tasks": len(timing.tasks),
    }
    return Night("airflow", len(studies), timing.wall_s, stages, counts, quarantined, extra)


def ledger_key_of(settings: Settings) -> str:
    """The run key of the only run in the ledger of ``settings`` (an Airflow night's ledger holds one run)."""
    connection = psycopg2.connect(settings.database.dsn.get_secret_value())
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_key FROM runs ORDER BY run_id")
            keys = [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()
    if len(keys) != 1:
        raise RuntimeError(f"expected one run in the Airflow night's ledger, found {len(keys)}")
    return str(keys[0])


# -- the floor -----------------------------------------------------------------------------------------------------


def floor_pacs_queries(settings: Settings, studies: Sequence[Study]) -> tuple[float, float]:
    """A STUDY-level C-FIND per accession, then a SERIES-level C-FIND per study, on one association; the seconds of
    each kind (the association's set-up counts to the first)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    pacs = settings.pacs
    ae = AE(ae_title=pacs.calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    seconds = {"STUDY": 0.0, "SERIES": 0.0}
    started = time.perf_counter()
    association = ae.associate(pacs.host, pacs.port, ae_title=pacs.called_ae)
    if not association.is_established:
        raise RuntimeError("the floor's C-FIND association was refused")
    seconds["STUDY"] += time.perf_counter() - started
    try:
        for level in ("STUDY", "SERIES"):
            started = time.perf_counter()
            for study in studies:
                keys = (
                    {"AccessionNumber": study.accession, "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""}
                    if level == "STUDY"
                    else {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": "", "Modality": "",
                          "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""}
                )  # fmt: skip
                query = Dataset()
                query.QueryRetrieveLevel = level
                for keyword, value in keys.items():
                    setattr(query, keyword, value)
                for _status, _identifier in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    pass
            seconds[level] += time.perf_counter() - started
    finally:
        association.release()
    return seconds["STUDY"], seconds["SERIES"]


def floor_retrieval(
    settings: Settings, studies: Sequence[Study], into: Path | None, streams: int = 2
) -> tuple[float, int]:
    """The chosen series as raw WADO-RS multipart streams, ``streams`` at a time, each written to one file under
    ``into`` and fsynced (None: read and dropped); seconds, bytes."""
    base = str(settings.pacs.dicomweb_url).rstrip("/")
    if into is not None:
        into.mkdir(parents=True, exist_ok=True)
    local = threading.local()

    def fetch(study: Study) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        url = f"{base}/studies/{study.study_uid}/series/{study.series_uid}"
        total = 0
        with session.get(url, headers={"Accept": WADO_ACCEPT}, stream=True, timeout=120) as answer:
            answer.raise_for_status()
            if into is None:
                for chunk in answer.iter_content(1 << 20):
                    total += len(chunk)
                return total
            with open(into / f"{study.series_uid}.multipart", "wb") as out:
                for chunk in answer.iter_content(1 << 20):
                    total += out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        return total

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        sizes = list(pool.map(fetch, studies))
    return time.perf_counter() - started, sum(sizes)


def _fhir_pages(session: requests.Session, url: str, params: dict[str, str]) -> int:
    """Follow a search's pages; the resources it returned."""
    count = 0
    answer = session.get(url, params=params, timeout=120)
    while True:
        answer.raise_for_status()
        bundle = answer.json()
        count += len(bundle.get("entry", []))
        following = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
        if following is None:
            return count
        answer = session.get(following, timeout=120)


def floor_fhir_reads(settings: Settings, studies: Sequence[Study], chunk: int = 50) -> tuple[float, float]:
    """Match's Patient lookups by MRN and the clinical stage's resources as raw batched searches (``chunk`` patients
    per OR-list, the ``[run] clinical_chunk_size`` default); the seconds of each."""
    from riskbridge.dev.synth.cohort import MRN_SYSTEM

    base = settings.fhir.base_url.rstrip("/")
    page = str(settings.fhir.page_size)
    session = requests.Session()
    session.headers["Accept"] = "application/fhir+json"
    parts = [studies[first : first + chunk] for first in range(0, len(studies), chunk)]
    started = time.perf_counter()
    for part in parts:
        mrns = ",".join(f"{MRN_SYSTEM}|{s.mrn}" for s in part)
        _fhir_pages(session, f"{base}/Patient", {"identifier": mrns, "_count": page})
    lookups = time.perf_counter() - started
    started = time.perf_counter()
    for part in parts:
        ids = ",".join(s.fhir_patient_id for s in part)
        _fhir_pages(session, f"{base}/Patient", {"_id": ids, "_count": page})
        for resource_type in ("Observation", "DocumentReference", "DiagnosticReport", "Condition"):
            _fhir_pages(session, f"{base}/{resource_type}", {"patient": ids, "_count": page})
    return lookups, time.perf_counter() - started


def floor_fhir_writes(settings: Settings, bundle_size: int) -> tuple[float, int]:
    """The RiskAssessments (and Provenances) the run wrote, read back and posted again as raw transaction bundles
    of conditional creates under a new identifier system, ``bundle_size`` RiskAssessments per bundle; seconds,
    resources."""
    base = settings.fhir.base_url.rstrip("/")
    session = requests.Session()
    session.headers.update({"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"})
    system = settings.writeback.identifier_system
    params = {"identifier": f"{system}|", "_revinclude": "Provenance:target", "_count": "1000"}
    entries: list[dict[str, Any]] = []
    answer = session.get(f"{base}/RiskAssessment", params=params, timeout=120)
    while True:
        answer.raise_for_status()
        bundle = answer.json()
        entries += [entry["resource"] for entry in bundle.get("entry", [])]
        following = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
        if following is None:
            break
        answer = session.get(following, timeout=120)
    assessments = [r for r in entries if r["resourceType"] == "RiskAssessment"]
    provenances = {ref["reference"].split("/_history")[0]: r for r in entries if r["resourceType"] == "Provenance"
                   for ref in r.get("target", [])}  # fmt: skip
    other = f"urn:riskbridge:bench-night-floor-{uuid.uuid4().hex[:8]}"
    bundles = []
    for first in range(0, len(assessments), bundle_size):
        transaction: list[dict[str, Any]] = []
        for assessment in assessments[first : first + bundle_size]:
            reference = f"RiskAssessment/{assessment['id']}"
            value = assessment["identifier"][0]["value"]
            full = f"urn:uuid:{uuid.uuid4()}"
            body = {k: v for k, v in assessment.items() if k not in ("id", "meta")}
            body["identifier"] = [{"system": other, "value": value}]
            transaction.append({"fullUrl": full, "resource": body, "request": {
                "method": "POST", "url": "RiskAssessment", "ifNoneExist": f"identifier={other}|{value}"}})  # fmt: skip
            provenance = provenances.get(reference)
            if provenance is not None:
                copy = {k: v for k, v in provenance.items() if k not in ("id", "meta")}
                copy["target"] = [{"reference": full}]
                transaction.append({"resource": copy, "request": {"method": "POST", "url": "Provenance"}})
        bundles.append({"resourceType": "Bundle", "type": "transaction", "entry": transaction})
    started = time.perf_counter()
    for bundle in bundles:
        session.post(base, data=json.dumps(bundle), timeout=120).raise_for_status()
    return time.perf_counter() - started, sum(len(b["entry"]) for b in bundles)


def floor_scoring(settings: Settings, staging: Path) -> tuple[float, float, int]:
    """The model's input work (read + preprocess every staged series, no cache) and its forward passes on those
    inputs in batches of the scorer's size, each timed alone; seconds of each, volumes."""
    import torch

    from riskbridge.harmonize.features import resolve_feature_spec
    from riskbridge.model.package import reference_package_path
    from riskbridge.model.preprocess import Preprocessor
    from riskbridge.model.scoring import Scorer

    scorer = Scorer.from_package(
        settings.run.model_package or reference_package_path(), resolve_feature_spec(settings.feature_spec)
    )
    preprocessor = Preprocessor(scorer.package.config.preprocess)
    series = sorted(d for d in staging.glob("*/*") if d.is_dir() and any(d.glob("*.dcm")))
    started = time.perf_counter()
    images = [preprocessor.from_series(d) for d in series]
    input_s = time.perf_counter() - started
    size = scorer.batch_size
    n_labs, n_notes = 2 * len(scorer.package.config.lab_features), 2 * len(scorer.package.config.note_features)
    started = time.perf_counter()
    with torch.inference_mode(), scorer.autocast():
        for first in range(0, len(images), size):
            batch = torch.from_numpy(np.stack(images[first : first + size])).to(scorer.device)
            rows = batch.shape[0]
            output = scorer.network(
                batch,
                torch.zeros((rows, n_labs), device=scorer.device),
                torch.zeros((rows, n_notes), device=scorer.device),
                torch.ones((rows, 3), dtype=torch.bool, device=scorer.device),
            )
            output.logits.float().cpu()
    return input_s, time.perf_counter() - started, len(images)


def staging_files(staging: Path, into: Path, workers: int = 2) -> tuple[float, float, int]:
    """What the staged series cost the disk as files, riskbridge's code aside: each series' bytes (read before the
    clock) written once as one file per series, fsynced (as the floor's retrieval writes them), and once as one
    file per instance through riskbridge's own staging writer (:class:`BackgroundWriter`: written on its threads,
    fsynced as a batch, renamed, the directory fsynced, as a retrieval stages them); ``workers`` series at a time
    (the retriever's ``pacs.workers``), the two ways alternating which goes first. Seconds of each, instances."""
    from riskbridge.connectors.staging import BackgroundWriter, fsync_directory

    series = sorted(d for d in staging.glob("*/*") if d.is_dir() and any(d.glob("*.dcm")))
    batches = [series[first : first + workers] for first in range(0, len(series), workers)]

    def one_file(index: int, files: list[bytes]) -> None:
        with open(into / f"series-{index}.bin", "wb") as out:
            for data in files:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())

    def per_instance(index: int, files: list[bytes]) -> None:
        directory = into / f"series-{index}"
        writer = BackgroundWriter()
        try:
            for number, data in enumerate(files):
                writer.submit(directory / f"{number}.dcm", [data])
        finally:
            committed = writer.close()
        if committed.failures:
            raise committed.failures[0].error
        fsync_directory(directory)

    seconds = {"series": 0.0, "instance": 0.0}
    instances = 0
    with ThreadPoolExecutor(workers) as pool:
        for number, batch in enumerate(batches):
            contents = [[path.read_bytes() for path in sorted(d.glob("*.dcm"))] for d in batch]
            instances += sum(len(files) for files in contents)
            ways = [("series", one_file), ("instance", per_instance)]
            for way, write in ways if number % 2 == 0 else ways[::-1]:
                into.mkdir(parents=True, exist_ok=True)
                os.sync()  # the other way's writeback is not this one's cost
                started = time.perf_counter()
                list(pool.map(write, range(len(contents)), contents))
                seconds[way] += time.perf_counter() - started
                shutil.rmtree(into)
    return seconds["series"], seconds["instance"], instances


def measure_floor(settings: Settings, studies: Sequence[Study], staging: Path, work: Path) -> dict[str, float]:
    """Every floor part of the night of ``studies`` (the run's staged series and written RiskAssessments)."""
    floor: dict[str, float] = {}
    floor["study queries"], floor["series queries"] = floor_pacs_queries(settings, studies)
    read_through(settings, studies)
    floor["retrieval bytes"], _ = floor_retrieval(settings, studies, work / "floor-wado")
    shutil.rmtree(work / "floor-wado", ignore_errors=True)
    floor["patient lookups"], floor["fhir reads"] = floor_fhir_reads(settings, studies)
    floor["model input"], floor["model forward"], _ = floor_scoring(settings, staging)
    floor["fhir writes"], _ = floor_fhir_writes(settings, settings.writeback.bundle_size)
    # Not floor parts (the night's floor sums FLOOR_PARTS only): what one file per instance costs the disk.
    floor["files per series"], floor["files per instance"], _ = staging_files(staging, work / "floor-files")
    return floor


# -- the report ----------------------------------------------------------------------------------------------------


def stage_floor(night: Night, floor: dict[str, float], stage: str) -> float:
    """The floor under one stage: its plain way's seconds, or the stage's own when riskbridge did it faster (a plain
    way that is slower bounds nothing, and must not hide overhead elsewhere)."""
    return min(sum(floor[part] for part in STAGE_FLOORS[stage]), night.stages.get(stage, 0.0))


def night_floor(night: Night, floor: dict[str, float]) -> float:
    """The floor of a whole night: the sum of its stages' floors."""
    return sum(stage_floor(night, floor, stage) for stage in STAGE_NAMES)


def fit(sizes: Sequence[int], walls: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line ``wall = a + b * N`` and the exponent of a power law ``wall ~ N^k`` (log-log slope)."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(walls, float), 1)
    k = float(np.polyfit(np.log(sizes), np.log(walls), 1)[0]) if len(sizes) > 1 else float("nan")
    return float(a), float(b), k


def plot(nights: Sequence[Night], floors: dict[int, dict[str, float]], path: Path) -> Path:
    """Wall time against N for each arm and the floor, with the per-stage split of the largest ``riskbridge run``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in dict.fromkeys(n.arm for n in nights):
        points = sorted((n.size, n.wall_s) for n in nights if n.arm == arm)
        left.plot(*zip(*points, strict=True), marker="o", label=arm)
    runs = {n.size: n for n in nights if n.arm == "riskbridge run"}
    sizes = sorted(runs)
    left.plot(sizes, [night_floor(runs[n], floors[n]) for n in sizes], marker="s", linestyle="--", label="floor")
    left.set_xlabel("index studies in the night (N)")
    left.set_ylabel("wall seconds")
    left.set_title("A night's wall time against N")
    left.legend()
    largest = max((n for n in nights if n.arm == "riskbridge run"), key=lambda n: n.size)
    floor = floors[largest.size]
    stages = list(STAGE_NAMES)
    spent = [largest.stages.get(s, 0.0) for s in stages]
    floor_of = [stage_floor(largest, floor, s) for s in stages]
    positions = np.arange(len(stages))
    right.barh(positions + 0.2, spent, height=0.4, label="riskbridge run")
    right.barh(positions - 0.2, floor_of, height=0.4, label="floor")
    right.set_yticks(positions, stages)
    right.invert_yaxis()
    right.set_xlabel("seconds")
    right.set_title(f"Where the time goes, N = {largest.size}")
    right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def report_body(
    nights: Sequence[Night],
    floors: dict[int, dict[str, float]],
    setup: dict[str, Any],
    plot_path: Path,
    report: Path,
) -> tuple[str, list[list[str]]]:
    """The section's markdown and its summary rows."""
    runs = {n.size: n for n in nights if n.arm == "riskbridge run"}
    flows = {n.size: n for n in nights if n.arm == "airflow"}
    header = ["N", "riskbridge run s", "floor s", "overhead s", "overhead share", "airflow s", "airflow - run s",
              "scored", "quarantined", "s per study"]  # fmt: skip
    summary = []
    for size in sorted(runs):
        run = runs[size]
        floor_s = night_floor(run, floors[size])
        flow = flows.get(size)
        summary.append([
            str(size), f"{run.wall_s:.1f}", f"{floor_s:.1f}", f"{run.wall_s - floor_s:.1f}",
            f"{(run.wall_s - floor_s) / run.wall_s:.0%}", f"{flow.wall_s:.1f}" if flow else "-",
            f"{flow.wall_s - run.wall_s:+.1f}" if flow else "-", str(run.done.get("score", 0)), str(run.quarantined),
            f"{run.wall_s / size:.2f}",
        ])  # fmt: skip
    stage_header = ["stage", *[f"N={n} run s" for n in sorted(runs)], *[f"N={n} floor s" for n in sorted(runs)]]
    stage_rows = []
    for stage in STAGE_NAMES:
        stage_rows.append(
            [stage, *[f"{runs[n].stages.get(stage, 0.0):.2f}" for n in sorted(runs)],
             *[f"{stage_floor(runs[n], floors[n], stage):.2f}" for n in sorted(runs)]]
        )  # fmt: skip
    between = [n.wall_s - sum(n.stages.values()) for n in (runs[s] for s in sorted(runs))]
    stage_rows.append(["between stages (run set-up, finish, report)", *[f"{b:.2f}" for b in between],
                       *["0.00" for _ in runs]])  # fmt: skip
    floor_header = ["floor part", *[f"N={n} s" for n in sorted(runs)], "what"]
    what = {
        "study queries": "STUDY-level C-FIND per accession, pynetdicom, one association (its set-up included)",
        "patient lookups": "Patient by MRN, raw batched search, 50 MRNs per OR-list",
        "series queries": "SERIES-level C-FIND per study on the same association",
        "retrieval bytes": "raw WADO-RS of the chosen series, transfer-syntax=*, 2 streams, written and fsynced",
        "fhir reads": "raw batched searches: Patient by id, Observation, DocumentReference, DiagnosticReport, "
        "Condition; 50 patients per OR-list",
        "model input": "read + preprocess every staged series (riskbridge's Preprocessor, no cache), one process",
        "model forward": "the network's forward passes on those inputs, batches of the scorer's size",
        "fhir writes": "the run's RiskAssessments + Provenances as raw transaction bundles of conditional creates",
    }
    floor_rows = [[part, *[f"{floors[n][part]:.2f}" for n in sorted(runs)], what[part]] for part in FLOOR_PARTS]
    text = [
        f"Cohort: {setup['patients']} synthetic patients, `{setup['image_size']}` images ({setup['series_desc']}), "
        f"generated in {setup['generate_s']:.0f} s and loaded into Orthanc and HAPI FHIR in {setup['load_s']:.0f} s "
        f"({setup['orthanc_gb']:.1f} GB of DICOM in Orthanc). Each night N scores the first N index studies by "
        "accession (an on-demand run: the same stages as a nightly one, without the window's C-FIND range); every "
        "night has a ledger database of its own and writes under an identifier system of its own, so nothing is "
        "skipped as done. Model: the shipped reference package on CPU, 2 threads. Orthanc's page cache alike for "
        "every arm: the night's series are read through (raw WADO-RS, bytes dropped, untimed) right before each "
        "arm that retrieves them (the run, the floor's retrieval, the Airflow run); the night's own staging writes "
        "evict them otherwise, and the arm after another would get the warm reads. " + setup["disk_note"],
        f"Run ended {setup.get('measured', 'at the time above')}. One-minute load average {setup['load_before']} "
        f"before and {setup['load_after']} after: other processes may share the 2 cores, so compare rows of this run "
        "only. " + setup.get("remark", ""),
        "### The night\n\n" + markdown_table(header, summary),
    ]
    sizes = sorted(runs)
    if len(sizes) > 1:
        a, b, k = fit(sizes, [runs[n].wall_s for n in sizes])
        growth = f"`riskbridge run`: wall = {a:.1f} s + {b:.2f} s x N; power-law exponent {k:.2f} (1.0 is linear)"
        if flows and len(flows) > 1:
            fa, fb, fk = fit(sorted(flows), [flows[n].wall_s for n in sorted(flows)])
            growth += f"; Airflow: {fa:.1f} s + {fb:.2f} s x N, exponent {fk:.2f}"
        marginal = []
        for small, large in itertools.pairwise(sizes):
            step = large - small
            floor_step = night_floor(runs[large], floors[large]) - night_floor(runs[small], floors[small])
            parts = [f"run {(runs[large].wall_s - runs[small].wall_s) / step:.2f}", f"floor {floor_step / step:.2f}"]
            if small in flows and large in flows:
                parts.append(f"Airflow {(flows[large].wall_s - flows[small].wall_s) / step:.2f}")
            marginal.append(f"N {small} -> {large}: {', '.join(parts)}")
        text.append(
            f"Growth with N: {growth}. The exponent of a fit through a fixed start-up cost reads below 1 even for "
            f"linear growth; the marginal seconds per study between sizes say more: {'; '.join(marginal)}. A "
            "marginal cost that rises with N is growth worse than linear."
        )
    largest = max(sizes)
    share = (runs[largest].wall_s - night_floor(runs[largest], floors[largest])) / runs[largest].wall_s
    overhead_text = (
        f"Overhead at N = {largest}: {share:.0%} of the night's wall time (target <= 20%: "
        f"{'met' if share <= 0.20 else 'not met'})."
    )
    # Runs before the per-instance files were measured have no such figures: neither the sentence nor the section.
    measured_files = all("files per instance" in floors[n] for n in sizes)
    if measured_files:
        files = files_cost(floors[largest])
        rest = runs[largest].wall_s - night_floor(runs[largest], floors[largest]) - files
        overhead_text += (
            f" Of it, {files:.1f} s is what writing one durable file per instance instead of one per series costs "
            f"this disk (section below); the rest, {rest:.1f} s, is {rest / runs[largest].wall_s:.0%} of the wall time."
        )
    text.append(overhead_text)
    text.append(
        "### Per stage (ledger `stage_timings`) beside its floor\n\n" + markdown_table(stage_header, stage_rows)
    )
    text.append("### The floor, part by part\n\n" + markdown_table(floor_header, floor_rows))
    if measured_files:
        text.append(files_section(runs, floors))
    if flows:
        flow_rows = []
        for n in sorted(flows):
            flow, extra = flows[n], flows[n].extra
            flow_rows.append(
                [str(n), f"{flow.wall_s:.1f}", f"{sum(flow.stages.values()):.1f}", f"{extra['task_s']:.1f}",
                 f"{extra['critical_path_s']:.1f}", f"{extra['scheduler_overhead_s']:.1f}",
                 f"{extra['queued_wait_s']:.1f}", str(extra["tasks"]), f"{flow.wall_s - runs[n].wall_s:+.1f}"]
            )  # fmt: skip
        flow_header = ["N", "DAG run s", "stage s (ledger)", "task s", "critical path s", "wall - critical path s",
                       "queued wait s", "task instances", "vs riskbridge run s"]  # fmt: skip
        text.append(
            "### Airflow's own cost\n\n"
            "DAG run s: trigger to the DAG run's end (the scheduler started and the DAG parsed before). Task s: the "
            "task instances' durations summed (each task's process start, DAG parse and imports included); critical "
            "path: the longest instance of each task, summed (the DAG is one chain whose mapped instances run side by "
            "side, 4 at a time); wall - critical path: the scheduler's own gaps between tasks.\n\n"
            + markdown_table(flow_header, flow_rows)
        )
    relative = os.path.relpath(plot_path, report.parent)
    text.append(f"![A night's wall time against N, and where it goes]({relative})")
    text.append(
        "Rerun: `.venv/bin/python bench/night.py` (`--sizes 10,30,100`; `--no-airflow` skips the scheduler arm; "
        "`--render FILE` rewrites the section from a run's results file, `.riskbridge/bench/night.json`; "
        "`--smoke --out DIR` is the CI's check)."
    )
    return "\n\n".join(text), summary


def files_cost(floor: dict[str, float]) -> float:
    """What one durable file per instance instead of one per series cost the disk (:func:`staging_files`)."""
    return floor["files per instance"] - floor["files per series"]


def files_section(runs: dict[int, Night], floors: dict[int, dict[str, float]]) -> str:
    """The section on what one file per instance costs the disk beside the retrieve stage's overhead."""
    rows = []
    for n in sorted(runs):
        floor = floors[n]
        files = files_cost(floor)
        over = runs[n].stages.get("retrieve", 0.0) - stage_floor(runs[n], floor, "retrieve")
        rows.append(
            [str(n), f"{floor['files per series']:.2f}", f"{floor['files per instance']:.2f}", f"{files:.2f}",
             f"{over:.2f}", f"{over - files:.2f}"]
        )  # fmt: skip
    header = ["N", "one file per series s", "one file per instance s", "difference s", "retrieve over its floor s",
              "retrieve over its floor, less the difference s"]  # fmt: skip
    return (
        "### What one file per instance costs the disk\n\n"
        "The floor's retrieval writes each series' stream as one file; the retrieve stage stages one Part-10 file "
        "per instance (what every DICOM receiver stores, and what scoring, retention and the completeness check "
        "read), each durable before it counts. Here the same staged bytes, read into memory before the clock, are "
        "written both ways by the same loop, 2 series at a time: one fsynced file per series, and one file per "
        "instance through riskbridge's own staging writer (written on its threads, fsynced as a batch, renamed, the "
        "series directory fsynced). The difference is what the per-instance files cost this disk; the last column "
        "is what the retrieve stage adds beyond the files themselves (receiving, parsing and checking each part, "
        "the ledger).\n\n" + markdown_table(header, rows)
    )


# -- main ----------------------------------------------------------------------------------------------------------


@contextmanager
def benchmark_site(base: Settings, work: Path, label: str, keep_staging: bool) -> Iterator[Settings]:
    """A synthetic site with a ledger of its own and a write-back identifier system of its own."""
    with synthetic_site(base, work, f"rb_bench_night_{label}") as site:
        writeback = site.writeback.model_copy(
            update={"identifier_system": f"urn:riskbridge:bench-night-{label}-{uuid.uuid4().hex[:8]}"}
        )
        retention = site.retention.model_copy(update={"staging_after_run": "keep" if keep_staging else "remove-scored"})
        yield site.model_copy(update={"writeback": writeback, "retention": retention})


def prepare_cohort(
    base: Settings, cohort_dir: Path, patients: int, seed: int | None, image_size: str
) -> dict[str, Any]:
    """Generate the cohort into ``cohort_dir`` and load it into the sandbox, or reuse it when ``cohort_dir`` holds
    one of at least ``patients`` patients with these parameters (any seed when ``seed`` is None; a new cohort gets a
    random one) whose studies Orthanc still has. The DICOM files are deleted once loaded (Orthanc holds
    them; the disk limits N). Return what the report says of it (``night-cohort.json``)."""
    described = cohort_dir / "night-cohort.json"
    wanted: dict[str, Any] = {"patients": patients, "image_size": image_size}
    wanted.update({} if seed is None else {"seed": seed})
    orthanc = f"http://127.0.0.1:{base.sandbox.orthanc_http_port}"
    if described.is_file():
        known = json.loads(described.read_text())
        same = all(known.get(k) == v for k, v in wanted.items() if k != "patients")
        if same and known.get("patients", 0) >= patients:
            found = requests.post(f"{orthanc}/tools/lookup", data=known["study_uids"][-1], timeout=60)
            if found.ok and found.json():
                # Again (idempotent PUTs): the sandbox HAPI keeps its data in memory, lost when it restarts.
                load_fhir(cohort_dir, base.fhir.base_url, LoadReport(cohort_id=str(known["seed"])))
                return dict(known)
    shutil.rmtree(cohort_dir, ignore_errors=True)
    wanted["seed"] = seed if seed is not None else random.randint(10**6, 10**9)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generate", total=patients)

        def advanced(stage: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=stage)

        started = time.perf_counter()
        generate(cohort_dir, patients=patients, seed=wanted["seed"], size=image_size, rates=CLEAN, progress=advanced)
        generate_s = time.perf_counter() - started
        dicom_bytes = bytes_of(cohort_dir / "dicom")
        study_uids = [s["study_uid"] for r in read_truth(cohort_dir) for s in (r["index_study"], *r["prior_studies"])]
        started = time.perf_counter()
        load(cohort_dir, orthanc, base.fhir.base_url, progress=advanced)
        load_s = time.perf_counter() - started
    shutil.rmtree(cohort_dir / "dicom")
    known = {**wanted, "generate_s": generate_s, "load_s": load_s, "dicom_bytes": dicom_bytes, "study_uids": study_uids}
    described.write_text(json.dumps(known))
    return known


def read_through(settings: Settings, studies: Sequence[Study], streams: int = 2) -> None:
    """Read the chosen series from Orthanc (raw WADO-RS, 2 streams) and drop the bytes, untimed, right before an arm
    that retrieves them: Orthanc's files then come from the page cache for every arm alike. Without it the first
    arm after another night's writes read them from disk: on the development VM 100 series (6.7 GB) came at 416
    images/s cold and 766 warm, and the floor, retrieving right after the run, always got the warm reads."""
    floor_retrieval(settings, studies, None, streams)


def load_average() -> str:
    """The one-minute load average."""
    return f"{os.getloadavg()[0]:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write its section of docs/benchmarks.md (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,30,100", help="comma-separated night sizes N (index studies)")
    parser.add_argument("--image-size", default="full", choices=("full", "small"))
    # A new cohort each run by default: cohorts of one seed and different sizes share MRNs under other FHIR ids,
    # which the match stage rightly calls conflicts once both are in the same FHIR server.
    parser.add_argument("--seed", type=int, default=None, help="the cohort's seed (default: a random one)")
    parser.add_argument("--no-airflow", action="store_true", help="skip the Airflow arm")
    parser.add_argument("--smoke", action="store_true", help="sizes 2,4 with small images and no Airflow: a check")
    parser.add_argument(
        "--cohort", type=Path, default=None,
        help="keep the cohort here (generated and loaded on first use, reused after; left in Orthanc)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write night.md, night.json and night.png here")
    parser.add_argument("--prepare-only", action="store_true", help="with --cohort: generate and load it, then stop")
    parser.add_argument("--render", type=Path, default=None, help="only write the report of a results file")
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads(args.render.read_text()), args.out)
        return 0
    if args.smoke:
        args.sizes, args.image_size, args.no_airflow = "2,4", "small", True
    if args.prepare_only and args.cohort is None:
        parser.error("--prepare-only needs --cohort")
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 1:
        parser.error("--sizes needs positive integers")
    # The floor reads the staged series in this process: pydicom's note on every 12-bit slice is noise here.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    base = load_settings()
    Sandbox(base).up(only=["orthanc", "hapi-fhir", "postgres"])
    work = Path(tempfile.mkdtemp(prefix="rb-bench-night-"))
    load_before = load_average()
    patients = sizes[-1] + max(2, sizes[-1] // 20)  # a few spare: a patient without a usable index study
    cohort_dir = args.cohort or work / "cohort"
    cohort: dict[str, Any] = {}
    try:
        cohort = prepare_cohort(base, cohort_dir, patients, args.seed, args.image_size)
        studies = index_studies(cohort_dir)
        if len(studies) < sizes[-1]:
            raise SystemExit(
                f"the cohort has {len(studies)} index studies with a chosen series, fewer than {sizes[-1]}"
            )
        if args.prepare_only:
            return 0
        patients, dicom_bytes = cohort["patients"], cohort["dicom_bytes"]
        generate_s, load_s = cohort["generate_s"], cohort["load_s"]
        console.print(
            f"cohort: {patients} patients, {dicom_bytes / 1e9:.1f} GB DICOM, generated in {generate_s:.0f} s, "
            f"loaded in {load_s:.0f} s"
        )
        read_through(base, studies[: sizes[-1]])
        with benchmark_site(base, work / "warm-up-night", "warm", keep_staging=False) as site:
            run_night(
                site, studies[: min(2, sizes[0])], "bench:night:warm-up", work
            )  # servers' first searches, untimed
        nights: list[Night] = []
        floors: dict[int, dict[str, float]] = {}
        for size in sizes:
            chosen = studies[:size]
            with benchmark_site(base, work / f"run-{size}", f"run{size}", keep_staging=True) as site:
                read_through(site, chosen)
                night = run_night(site, chosen, f"bench:night:{size}", work)
                nights.append(night)
                floors[size] = measure_floor(site, chosen, site.staging_dir, work)
            console.print(
                f"N={size}: riskbridge run {night.wall_s:.1f} s, floor {night_floor(night, floors[size]):.1f} s"
            )
            shutil.rmtree(work / f"run-{size}", ignore_errors=True)
            if not args.no_airflow:
                with benchmark_site(base, work / f"airflow-{size}", f"af{size}", keep_staging=False) as site:
                    read_through(site, chosen)
                    flow = airflow_night(site, chosen, work / f"airflow-{size}", f"bench_night_{size}")
                nights.append(flow)
                console.print(f"N={size}: airflow {flow.wall_s:.1f} s")
                shutil.rmtree(work / f"airflow-{size}", ignore_errors=True)
        per_study_gb = dicom_bytes / patients / 1e9
        free_gb = shutil.disk_usage(work).free / 1e9
        thin = {"full": "512x512, 128 thin slices", "small": "128x128, 64 thin slices"}[args.image_size]
        setup = {
            "patients": patients,
            "image_size": args.image_size,
            "series_desc": f"{thin} per series; {per_study_gb * 1000:.0f} MB of DICOM per patient, all series",
            "generate_s": generate_s,
            "load_s": load_s,
            "orthanc_gb": dicom_bytes / 1e9,
            "disk_note": (
                f"The disk limits N: each patient's studies take {per_study_gb * 1000:.0f} MB in Orthanc and the "
                f"generator writes them once more before the load, so 300 patients would need "
                f"{per_study_gb * 300 * 2:.0f} GB at the peak; {free_gb:.0f} GB were still free with this cohort "
                "loaded."
            ),
            "load_before": load_before,
            "load_after": load_average(),
            "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        results = {"nights": [asdict(n) for n in nights], "floors": {str(k): v for k, v in floors.items()},
                   "setup": setup}  # fmt: skip
        saved = (args.out / "night.json") if args.out else RESULTS
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))
        console.print(f"results in {saved}")
        render(results, args.out)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cohort and args.cohort is None:
            removed = delete_from_orthanc(base, cohort["study_uids"])
            console.print(f"removed {removed} studies of the cohort from Orthanc")


def render(results: dict[str, Any], out: Path | None) -> None:
    """Write the report of ``results`` (``night.json``'s content): docs/benchmarks.md's section and docs/img/night.png,
    or night.md, night.json and night.png in ``out``."""
    nights = [Night(**n) for n in results["nights"]]
    floors = {int(k): v for k, v in results["floors"].items()}
    setup = results["setup"]
    if out:
        out.mkdir(parents=True, exist_ok=True)
    plot_path = plot(nights, floors, (out / "night.png") if out else PLOT)
    body, summary = report_body(nights, floors, setup, plot_path, (out / "night.md") if out else REPORT)
    table = Table(*["N", "run s", "floor s", "overhead s", "share", "airflow s", "airflow - run", "scored",
                    "quarantined", "s/study"])  # fmt: skip
    for row in summary:
        table.add_row(*row)
    console.print(table)
    if out:
        (out / "night.md").write_text(body + "\n")
        console.print(f"written to {out}")
    else:
        path = write_section("night", "A night end to end, against its physical floor (bench/night.py)", body)
        console.print(f"written to {path}")


def delete_from_orthanc(base: Settings, study_uids: Sequence[str]) -> int:
    """Delete these studies from the sandbox Orthanc (the benchmark's cohort: gigabytes); return how many it had."""
    orthanc = f"http://127.0.0.1:{base.sandbox.orthanc_http_port}"
    deleted = 0
    with requests.Session() as session:
        for uid in study_uids:
            found = session.post(f"{orthanc}/tools/lookup", data=uid, timeout=60)
            found.raise_for_status()
            for item in found.json():
                if item.get("Type") == "Study":
                    session.delete(f"{orthanc}/studies/{item['ID']}", timeout=600).raise_for_status()
                    deleted += 1
    return deleted


if __name__ == "__main__":
    sys.exit(main())
