"""The fault suite (issue item 9): real servers failing in the middle of a pipeline run, then the run resumed under
the same run key, and checked against the synthetic cohort's truth: no study lost (each is scored with its one
RiskAssessment, or quarantined with its truth reason or a minimum-data policy reason), no RiskAssessment duplicated.

Every fault runs against a sandbox of this module's own (Orthanc, HAPI FHIR, PostgreSQL on ports 2xxxx under a
temporary directory, started and stopped with riskbridge's sandbox code), never the shared one other tests use:

- PACS killed (SIGKILL of our Orthanc) once the retrieve stage has staged some instances, over C-MOVE and over
  WADO-RS; restarted through the sandbox code after the run has gone on without it;
- FHIR 503, timeout and connection reset mid-page (a later page of a clinical search) and mid-bundle (write-back
  transactions after the first): HAPI cannot fail on demand, so a **fault proxy** (tests/fault_support.py
  FhirFaultProxy) forwards to the real HAPI and injects the fault; timeout and reset let HAPI process the request
  and lose the answer, which is what can duplicate a RiskAssessment;
- PostgreSQL (the ledger) restarted (fast shutdown, then start) while the retrieve stage runs;
- staging disk full: staging on a small tmpfs mounted for the test, then remounted bigger;
- the ``riskbridge run`` process SIGKILLed once the ledger shows harmonize done (the score stage started).

Each fault has its own ledger database, model version and RiskAssessment identifier system. Measured figures are
printed at the end of the module (``pytest -s``) and are tabulated in docs/reliability.md "Faults".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    FaultSandbox,
    FhirFaultProxy,
    Outcome,
    Request,
    ledger_count,
    outcome,
    run_cli,
    staged_files,
    wait_for,
)
from synthetic_site import synthetic_site_settings
from tiny_model import tiny_package

from riskbridge.dev.synth import EdgeCaseRates, generate, load, read_truth
from riskbridge.ledger import Ledger
from riskbridge.pipeline import Pipeline, StageResult, window_of_days
from riskbridge.settings import RunSettings, Settings, load_settings

pytestmark = pytest.mark.integration

ZONE = "America/New_York"
WINDOW = (date(2024, 1, 1), date(2024, 1, 14))
RATES = EdgeCaseRates(shared_mrn=0.1, no_fhir_patient=0.1, no_usable_series=0.1)
RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def box() -> Iterator[FaultSandbox]:
    """This module's own sandbox; stopped (only its own processes) when the module ends."""
    sandbox = FaultSandbox(load_settings())
    try:
        sandbox.up()
        yield sandbox
    finally:
        sandbox.down()
        if RESULTS:
            print("\nfault results:\n" + "\n".join(json.dumps(row) for row in RESULTS))
            table = os.environ.get("RISKBRIDGE_FAULTS_RESULTS")
            if table:
                Path(table).write_text(json.dumps(RESULTS, indent=1))


@pytest.fixture(scope="module")
def cohort(box: FaultSandbox, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("faults") / "cohort"
    generate(out, patients=10, seed=67, rates=RATES)
    load(out, f"http://127.0.0.1:{box.settings.sandbox.orthanc_http_port}", box.settings.fhir.base_url)
    return out, read_truth(out)


@pytest.fixture(scope="module")
def truth(cohort: tuple[Path, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return cohort[1]


@pytest.fixture(scope="module")
def shared_staging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Staging for the faults that are not about imaging: retrieved once, found staged by the later runs."""
    return tmp_path_factory.mktemp("shared-staging")


@pytest.fixture(scope="module")
def make_settings(box: FaultSandbox, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    def make(name: str, staging: Path | None = None) -> Settings:
        directory = tmp_path_factory.mktemp(name)
        package = tiny_package(directory / "tiny", version=f"0.0.9-{name}-{uuid.uuid4().hex[:6]}", spacing_mm=8.0)
        database = box.create_database(f"rb_fault_{name.replace('-', '_')}")
        run = RunSettings(
            report_dir=directory / "reports",
            retrieve_chunk_size=4,
            clinical_chunk_size=5,
            model_package=package,
            quarantine_alert_fraction=1.0,
        )
        settings = synthetic_site_settings(box.settings, database, directory, run)
        pacs = settings.pacs.model_copy(update={"max_attempts": 2, "timeout_s": 10.0, "staging_min_free_mb": 0})
        writeback = settings.writeback.model_copy(
            update={
                "identifier_system": f"urn:riskbridge:test-faults-{name}-{uuid.uuid4().hex[:8]}",
                "bundle_size": 4,
                "bundle_workers": 1,
            }
        )
        update: dict[str, Any] = {"pacs": pacs, "writeback": writeback}
        if staging is not None:
            update["staging_dir"] = staging
        return settings.model_copy(update=update)

    return make


def _window() -> tuple[Any, Any]:
    return window_of_days(*WINDOW, ZONE)


def _first_run(settings: Settings, run_key: str) -> tuple[int, list[StageResult], BaseException | None]:
    """The run the fault hits: every stage once. Returns its id, its results and the error that stopped it."""
    results: list[StageResult] = []
    error: BaseException | None = None
    pipeline = Pipeline.from_settings(settings)
    run_id = pipeline.start_run("nightly", run_key, _window())
    try:
        results = pipeline.run_stages(run_id)
    except Exception as exc:  # the fault: the run stops here, as a crashed task would
        error = exc
    finally:
        with contextlib.suppress(Exception):  # a connection the fault broke
            pipeline.close()
    return run_id, results, error


def _resume(settings: Settings, run_key: str, run_id: int) -> tuple[float, list[StageResult]]:
    """Resume the run under the same key in a new Pipeline (a new process would do the same) until it succeeds;
    return the seconds it took and the results."""
    began = time.perf_counter()
    with Pipeline.from_settings(settings) as pipeline:
        assert pipeline.start_run("nightly", run_key, _window()) == run_id
        results = pipeline.run_stages(run_id)
        assert sum(r.failed for r in results) == 0, results
        pipeline.finish_run(run_id)
    return time.perf_counter() - began, results


def _record(
    fault: str,
    settings: Settings,
    box: FaultSandbox,
    run_id: int,
    truth: list[dict[str, Any]],
    runs: int,
    recover_s: float,
    **extra: Any,
) -> Outcome:
    found = outcome(settings, box.settings.fhir.base_url, run_id, truth)
    RESULTS.append(
        {
            "fault": fault,
            "runs": runs,
            "studies": len(truth),
            "scored": len(found.scored),
            "lost": len(found.lost),
            "duplicated": found.duplicated,
            "recover_s": round(recover_s, 1),
            "writebacks": found.writeback_status,
            **extra,
        }
    )
    assert found.lost == [], found
    assert found.duplicated == 0, found
    assert found.run_status == "success"
    assert found.assessments == len(found.scored) > 0
    return found


def _failed(results: list[StageResult], stage: str) -> int:
    return sum(r.failed for r in results if r.stage == stage)


# --- PACS killed mid-retrieval ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["c-move", "dicomweb"])
def test_pacs_killed_mid_retrieval_then_restarted(
    box: FaultSandbox, truth: list[dict[str, Any]], make_settings: Callable[..., Settings], transport: str
) -> None:
    name = f"pacs-kill-{transport}"
    settings = make_settings(name)
    settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"transport": transport})})
    killed: dict[str, Any] = {}

    def kill_once_some_staged() -> None:
        wait_for(lambda: staged_files(settings.staging_dir) >= 40, 120, "the first staged instances")
        killed["staged"] = staged_files(settings.staging_dir)
        killed["pid"] = box.kill("orthanc")

    killer = threading.Thread(target=kill_once_some_staged, daemon=True)
    killer.start()
    run_id, first, error = _first_run(settings, f"faults:{name}")
    killer.join(timeout=5)
    assert error is None and "pid" in killed, (error, killed)
    assert _failed(first, "retrieve") > 0, first  # the kill hit series still in flight or to come
    restart_s = box.start("orthanc")
    recover_s, rest = _resume(settings, f"faults:{name}", run_id)
    assert sum(r.done for r in rest if r.stage == "retrieve") == _failed(first, "retrieve")
    _record(
        f"PACS (Orthanc) SIGKILLed mid-{'C-MOVE' if transport == 'c-move' else 'WADO-RS'}",
        settings, box, run_id, truth, 2, recover_s,
        detail=f"{_failed(first, 'retrieve')} series failed after {killed['staged']} instances staged; "
        f"Orthanc restart {restart_s:.1f} s",
    )  # fmt: skip


# --- FHIR faults through the fault proxy ------------------------------------------------------------------------------


def _later_page(request: Request) -> bool:
    return request.method == "GET" and "_getpages=" in request.target


def _after_first_transaction() -> Callable[[Request], bool]:
    seen = {"n": 0}
    lock = threading.Lock()

    def rule(request: Request) -> bool:
        if request.method != "POST" or request.target.split("?")[0].rstrip("/") != "/fhir":
            return False
        with lock:
            seen["n"] += 1
            return seen["n"] > 1

    return rule


@pytest.fixture(scope="module")
def proxy(box: FaultSandbox) -> Iterator[FhirFaultProxy]:
    server = FhirFaultProxy(upstream_port=box.settings.sandbox.hapi_port).start()
    yield server
    server.close()


@pytest.mark.parametrize("where", ["page", "bundle"])
@pytest.mark.parametrize("mode", ["503", "timeout", "reset"])
def test_fhir_fault_mid_page_or_bundle_then_resumed(
    box: FaultSandbox,
    truth: list[dict[str, Any]],
    make_settings: Callable[..., Settings],
    shared_staging: Path,
    proxy: FhirFaultProxy,
    mode: str,
    where: str,
) -> None:
    name = f"fhir-{mode}-{where}"
    settings = make_settings(name, staging=shared_staging)
    fhir = settings.fhir.model_copy(
        update={
            "base_url": proxy.base_url,
            "timeout_s": 2.0,
            "page_size": 10,  # the clinical searches page, so that a later page can fail
            "retry": settings.fhir.retry.model_copy(update={"max_attempts": 2, "backoff_base_s": 0.1}),
        }
    )
    settings = settings.model_copy(update={"fhir": fhir})
    proxy.arm(mode, _later_page if where == "page" else _after_first_transaction())
    try:
        run_id, first, error = _first_run(settings, f"faults:{name}")
    finally:
        proxy.disarm()
    faulted = proxy.faulted
    assert faulted > 0, "the fault never fired"
    if where == "page":
        assert error is not None, first  # a clinical chunk whose search fails stops the run
        # The page request was retried before the run gave up (a GET cut off mid-body included: requests raises
        # ChunkedEncodingError there, which the client did not retry before this suite found it).
        assert faulted >= fhir.retry.max_attempts, faulted
    else:
        assert error is None and _failed(first, "write_back") > 0, (error, first)
    recover_s, _ = _resume(settings, f"faults:{name}", run_id)
    found = _record(
        f"FHIR {mode} mid-{where} (fault proxy)", settings, box, run_id, truth, 2, recover_s,
        detail=f"{faulted} request(s) faulted; first run: {type(error).__name__ if error else 'write-back failed'}",
    )  # fmt: skip
    if where == "bundle" and mode != "503":
        # HAPI processed the bundles whose answers were lost: the resumed write-back found them by the conditional
        # create (exists), and created nothing twice.
        assert found.writeback_status.get("exists", 0) > 0, found


# --- PostgreSQL restarted mid-run -------------------------------------------------------------------------------------


def test_ledger_postgres_restarted_mid_run(
    box: FaultSandbox, truth: list[dict[str, Any]], make_settings: Callable[..., Settings]
) -> None:
    name = "postgres-restart"
    settings = make_settings(name)
    restarted: dict[str, float] = {}

    def restart_once_retrieving() -> None:
        query = "SELECT count(*) FROM retrievals"
        wait_for(lambda: ledger_count(settings.database, query) >= 1, 120, "the first retrieval recorded", 0.1)
        began = time.perf_counter()
        box.stop("postgres")
        box.start("postgres")
        restarted["s"] = time.perf_counter() - began

    restarter = threading.Thread(target=restart_once_retrieving, daemon=True)
    restarter.start()
    run_id, first, error = _first_run(settings, f"faults:{name}")
    restarter.join(timeout=60)
    assert "s" in restarted and error is not None, (restarted, error, first)
    recover_s, _ = _resume(settings, f"faults:{name}", run_id)
    _record(
        "PostgreSQL (ledger) restarted mid-retrieve", settings, box, run_id, truth, 2, recover_s,
        detail=f"restart {restarted['s']:.1f} s; first run stopped: {type(error).__name__}",
    )  # fmt: skip


# --- staging disk full ------------------------------------------------------------------------------------------------


def _chosen_series_size(cohort_dir: Path, truth: list[dict[str, Any]]) -> tuple[int, int]:
    """Bytes and instances of the series the pipeline will retrieve."""
    total = count = 0
    for record in truth:
        series = record.get("correct_series_uid")
        if series and record["quarantine"] is None:
            directory = cohort_dir / "dicom" / record["index_study"]["study_uid"] / series
            for path in directory.glob("*.dcm"):
                total += path.stat().st_size
                count += 1
    return total, count


def test_staging_disk_full_then_space_freed(
    box: FaultSandbox,
    cohort: tuple[Path, list[dict[str, Any]]],
    make_settings: Callable[..., Settings],
) -> None:
    cohort_dir, truth = cohort
    name = "disk-full"
    mount = Path(tempfile.mkdtemp(prefix="riskbridge-staging-tmpfs-"))
    total, instances = _chosen_series_size(cohort_dir, truth)
    small_mb = max(1, total // (2 * 1024 * 1024))  # room for about half of the series
    command = ["mount", "-t", "tmpfs", "-o", f"size={small_mb}m", "tmpfs", str(mount)]
    mounted = subprocess.run(command, capture_output=True, check=False).returncode == 0
    settings = make_settings(name, staging=mount)
    # The guard's per-instance estimate set to this cohort's real size (the default is a full-size CT slice's), so
    # the first series fit and the guard or ENOSPC stops the rest.
    pacs = settings.pacs.model_copy(update={"staging_instance_kb": -(-total // (instances * 1024))})
    settings = settings.model_copy(update={"pacs": pacs})
    if not mounted:
        # No tmpfs (not root, or no CAP_SYS_ADMIN): the closest real fault is the free-space guard on the real disk,
        # asked to keep more free than the disk has.
        free_mb = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize // (1024 * 1024)
        pacs = settings.pacs.model_copy(update={"staging_min_free_mb": free_mb + 1024})
        settings = settings.model_copy(update={"pacs": pacs})
    try:
        run_id, first, error = _first_run(settings, f"faults:{name}")
        assert error is None, error
        with Ledger.connect(settings.database) as ledger:
            reasons = [reason for _, reason, _ in ledger.quarantined(run_id).values()]
        retrieved = sum(r.done for r in first if r.stage == "retrieve")
        assert _failed(first, "retrieve") > 0 and "staging_disk_full" in reasons, (first, reasons)
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        else:
            pacs = settings.pacs.model_copy(update={"staging_min_free_mb": 0})
            settings = settings.model_copy(update={"pacs": pacs})
        recover_s, _ = _resume(settings, f"faults:{name}", run_id)
        _record(
            f"staging disk full ({'tmpfs ' + str(small_mb) + ' MiB' if mounted else 'free-space guard, no tmpfs'})",
            settings, box, run_id, truth, 2, recover_s,
            detail=f"{retrieved} series staged, {_failed(first, 'retrieve')} quarantined "
            f"{sorted(set(reasons) - {'identity_conflict', 'identity_unmatched', 'no_usable_series'})}; "
            "resumed after remounting at 512 MiB",
        )  # fmt: skip
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)
        os.rmdir(mount) if not any(mount.iterdir()) else None


# --- the score process killed -----------------------------------------------------------------------------------------


def _toml(settings: Settings) -> str:
    pacs, run, writeback = settings.pacs, settings.run, settings.writeback
    issuers = ", ".join(f'"{k}" = "{v}"' for k, v in settings.identity.issuer_systems.items())
    return f"""
staging_dir = "{settings.staging_dir}"
model_dir = "{settings.model_dir}"
[site]
timezone = "{settings.site.timezone}"
[identity]
issuer_systems = {{ {issuers} }}
default_issuer = "{settings.identity.default_issuer}"
[writeback]
identifier_system = "{writeback.identifier_system}"
bundle_size = {writeback.bundle_size}
bundle_workers = {writeback.bundle_workers}
[pacs]
host = "{pacs.host}"
port = {pacs.port}
scp_port = {pacs.scp_port}
dicomweb_url = "{pacs.dicomweb_url}"
max_attempts = {pacs.max_attempts}
staging_min_free_mb = 0
[fhir]
base_url = "{settings.fhir.base_url}"
[database]
dsn = "{settings.database.dsn.get_secret_value()}"
[run]
report_dir = "{run.report_dir}"
model_package = "{run.model_package}"
retrieve_chunk_size = {run.retrieve_chunk_size}
clinical_chunk_size = {run.clinical_chunk_size}
quarantine_alert_fraction = 1.0
"""


def test_score_process_killed_then_rerun(
    box: FaultSandbox,
    truth: list[dict[str, Any]],
    make_settings: Callable[..., Settings],
    shared_staging: Path,
    tmp_path: Path,
) -> None:
    name = "score-kill"
    settings = make_settings(name, staging=shared_staging)
    config = tmp_path / "riskbridge.toml"
    config.write_text(_toml(settings))
    run_key = f"faults:{name}"
    args = ["--window", "2024-01-01..2024-01-14", "--run-key", run_key]
    log = (tmp_path / "run.log").open("wb")
    process = run_cli(config, args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        query = "SELECT count(*) FROM stage_timings WHERE stage = 'harmonize'"
        wait_for(lambda: ledger_count(settings.database, query) > 0 or process.poll() is not None, 180,
                 "harmonize done (the score stage starting)")  # fmt: skip
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "run.log").read_text()
    scored_at_kill = ledger_count(settings.database, "SELECT count(*) FROM scores")
    began = time.perf_counter()
    again = run_cli(config, args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    assert again.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    recover_s = time.perf_counter() - began
    with Ledger.connect(settings.database) as ledger:
        run_id = ledger.run_by_key(run_key).run_id
    _record(
        "`riskbridge run` SIGKILLed in the score stage", settings, box, run_id, truth, 2, recover_s,
        detail=f"{scored_at_kill} score(s) recorded at the kill; recovery is a new `riskbridge run` process",
    )  # fmt: skip
