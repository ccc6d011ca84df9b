"""riskbridge.dev.processes: Settings -> RISKBRIDGE_* environment (round trip through load_settings), and the
subprocess helpers (start, logs, a dead process noticed, a process tree stopped or killed whole); and the pure parts
of bench/_airflow_scheduler.py, which uses them (a run's timing figures, the metadata URL, the tasks' environment)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from pydantic import SecretStr

from riskbridge.dev.processes import (
    Processes,
    UnrepresentableSettingError,
    free_port,
    settings_environment,
    wait_for,
)
from riskbridge.dev.synth import site_environment
from riskbridge.dev.synth.cohort import MRN_SYSTEM, PACS_ISSUER, SITE_TIMEZONE
from riskbridge.settings import (
    DatabaseSettings,
    FhirAuth,
    IdentitySettings,
    Settings,
    SiteSettings,
    TlsSettings,
    load_settings,
)


@pytest.fixture
def child_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without riskbridge.toml (conftest already cleared RISKBRIDGE_*): what a child sees."""
    home = tmp_path / "child"
    home.mkdir()
    monkeypatch.chdir(home)
    return home


def _loaded_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_default_settings_need_no_variables(child_view: Path) -> None:
    assert settings_environment(Settings()) == {}


def test_a_site_built_in_python_comes_back_whole_from_its_environment(
    child_view: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = []
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
        files.append(tmp_path / name)
    base = Settings()
    settings = base.model_copy(
        update={
            "database": DatabaseSettings(dsn=SecretStr("postgresql://rb:pw@127.0.0.1:15432/rb_bench_1")),
            "site": SiteSettings(timezone=SITE_TIMEZONE),
            "identity": IdentitySettings(issuer_systems={PACS_ISSUER: MRN_SYSTEM}, default_issuer=PACS_ISSUER),
            "staging_dir": tmp_path / "staging",
            "pacs": base.pacs.model_copy(
                update={
                    "workers": 1,
                    "scp_allowed_peers": ["127.0.0.1", "10.0.0.0/8"],
                    "tls": TlsSettings(ca_file=files[0], cert_file=files[1], key_file=files[2]),
                    "dicomweb": base.pacs.dicomweb.model_copy(
                        update={"auth": FhirAuth(type="bearer", token=SecretStr("dicomweb-token"))}
                    ),
                }
            ),
            "fhir": base.fhir.model_copy(
                update={"auth": FhirAuth(type="basic", username="u", password=SecretStr("fhir-pass")), "timeout_s": 7.5}
            ),
            "writeback": base.writeback.model_copy(update={"identifier_system": "urn:riskbridge:bench-x"}),
            "run": base.run.model_copy(update={"report_dir": tmp_path / "reports", "quarantine_alert_fraction": 1.0}),
            "airflow": base.airflow.model_copy(update={"score_queue": "gpu", "pacs_conn_id": ""}),
            "retention": base.retention.model_copy(update={"staging_after_run": "keep"}),
        }
    )
    env = settings_environment(settings)

    assert _loaded_from(env, monkeypatch) == settings
    # Only what differs from the defaults, section by section; secrets in clear, structures as JSON.
    assert env["RISKBRIDGE_PACS__WORKERS"] == "1"
    assert env["RISKBRIDGE_FHIR__AUTH__PASSWORD"] == "fhir-pass"
    assert env["RISKBRIDGE_PACS__DICOMWEB__AUTH__TOKEN"] == "dicomweb-token"
    assert env["RISKBRIDGE_AIRFLOW__PACS_CONN_ID"] == ""
    assert "RISKBRIDGE_PACS__PORT" not in env and "RISKBRIDGE_FHIR__BASE_URL" not in env
    assert all(name.startswith("RISKBRIDGE_") for name in env)


def test_the_synthetic_site_gives_the_variables_of_site_environment(child_view: Path) -> None:
    settings = Settings().model_copy(
        update={
            "site": SiteSettings(timezone=SITE_TIMEZONE),
            "identity": IdentitySettings(issuer_systems={PACS_ISSUER: MRN_SYSTEM}, default_issuer=PACS_ISSUER),
        }
    )
    assert settings_environment(settings) == site_environment()


def test_none_over_a_default_has_no_environment_form(child_view: Path) -> None:
    settings = Settings()
    settings = settings.model_copy(update={"pacs": settings.pacs.model_copy(update={"dicomweb_url": None})})
    with pytest.raises(UnrepresentableSettingError, match="RISKBRIDGE_PACS__DICOMWEB_URL"):
        settings_environment(settings)


def test_wait_for_returns_the_seconds_or_times_out() -> None:
    moments = iter([False, False, True])
    assert wait_for("third poll", lambda: next(moments), timeout_s=5, interval_s=0.01) >= 0.02
    with pytest.raises(TimeoutError, match="never: not within 0 s"):
        wait_for("never", lambda: False, timeout_s=0.05, interval_s=0.01)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))


def _tree_command(marker: Path) -> list[str]:
    """A shell that starts a long sleep below itself, says so and waits: a parent with a child."""
    return ["sh", "-c", f"sleep 300 & echo started > {marker}; echo hello; wait"]


def test_processes_log_notice_an_exit_and_stop_whole_trees(tmp_path: Path) -> None:
    processes = Processes(tmp_path / "logs")
    marker = tmp_path / "started"
    try:
        parent = processes.start("tree", _tree_command(marker), {"PATH": "/usr/bin:/bin"})
        processes.start("short", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"], {})
        wait_for("the tree's child", marker.is_file, timeout_s=10, interval_s=0.05)
        children = psutil.Process(parent.pid).children(recursive=True)
        assert children
        wait_for("the short one to exit", lambda: processes.running["short"].poll() is not None, timeout_s=10)
        with pytest.raises(RuntimeError, match="short exited with 3"):
            processes.check_alive()
        assert "bye" in processes.log("short")
        assert "hello" in processes.log("tree")
        processes.stop_all(timeout_s=5)
        time.sleep(0.1)
        assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
        assert processes.running == {}
    finally:
        processes.stop_all(timeout_s=1)


def test_kill_tree_sigkills_a_process_and_its_children(tmp_path: Path) -> None:
    processes = Processes(tmp_path / "logs")
    marker = tmp_path / "started"
    try:
        parent = processes.start("tree", _tree_command(marker), {"PATH": "/usr/bin:/bin"})
        wait_for("the tree's child", marker.is_file, timeout_s=10, interval_s=0.05)
        killed = processes.kill_tree("tree")
        assert parent.pid in killed and len(killed) >= 2
        assert parent.returncode == -9
        assert "tree" not in processes.running
    finally:
        processes.stop_all(timeout_s=1)


# --- bench/_airflow_scheduler.py: its pure parts (the scheduler itself: `python bench/_airflow_scheduler.py`) ---


def bench_airflow() -> ModuleType:
    """bench/_airflow_scheduler.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "_airflow_scheduler.py"
    spec = importlib.util.spec_from_file_location("bench_airflow_scheduler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_a_runs_timing_sums_tasks_waits_and_takes_the_longest_mapped_instance() -> None:
    bench = bench_airflow()
    t0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)

    def task(task_id: str, map_index: int, queued: float, start: float, end: float) -> Any:
        at = [t0 + timedelta(seconds=s) for s in (queued, start, end)]
        return bench.TaskTiming(task_id, map_index, "success", 1, *at, end - start, "default_pool", "default")

    tasks = (
        task("start_run", -1, 1.0, 1.5, 4.5),  # 3 s
        task("retrieve", 0, 5.0, 5.5, 9.5),  # 4 s
        task("retrieve", 1, 5.0, 6.0, 12.0),  # 6 s: the longer of the two
        task("finish_run", -1, 13.0, 13.5, 15.5),  # 2 s
    )
    run = bench.DagRunTiming("d", "r", "success", t0, t0, t0 + timedelta(seconds=0.5), t0 + timedelta(seconds=16),
                             tasks)  # fmt: skip
    assert run.wall_s == 16.0
    assert run.task_s == 15.0
    assert run.queued_wait_s == pytest.approx(0.5 + 0.5 + 1.0 + 0.5)
    assert run.critical_path_s == 11.0
    assert run.scheduler_overhead_s == 5.0
    summary = run.summary()
    assert summary["trigger_to_start_s"] == 0.5 and [row["task"] for row in summary["tasks"]][1] == "retrieve[0]"
    unfinished = bench.DagRunTiming("d", "r", "running", t0, t0, t0, None, tasks)
    assert unfinished.wall_s is None and unfinished.scheduler_overhead_s is None


def test_the_metadata_url_of_a_libpq_dsn() -> None:
    url = bench_airflow().sqlalchemy_url
    assert url("postgresql://riskbridge@127.0.0.1:15432/rb_airflow_1") == (
        "postgresql+psycopg2://riskbridge@127.0.0.1:15432/rb_airflow_1"
    )
    assert url("host=db.example port=5433 dbname=meta user=u password=p@ss/w sslmode=require") == (
        "postgresql+psycopg2://u:p%40ss%2Fw@db.example:5433/meta?sslmode=require"
    )


def test_the_tasks_environment_is_the_settings_alone(child_view: Path, tmp_path: Path) -> None:
    settings = Settings().model_copy(update={"staging_dir": tmp_path / "staging"})
    config = tmp_path / "work" / "riskbridge-empty.toml"
    inherited = {
        "PATH": "/usr/bin",
        "RISKBRIDGE_PACS__PORT": "104",  # the shell's: must not reach the tasks
        "RISKBRIDGE_PSEUDONYM_KEY": "k" * 32,  # the site's key: must
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    }
    env = bench_airflow().child_environment(settings, config, inherited)
    assert env == {
        "PATH": "/usr/bin",
        "RISKBRIDGE_PSEUDONYM_KEY": "k" * 32,
        "RISKBRIDGE_STAGING_DIR": str(tmp_path / "staging"),
        "RISKBRIDGE_CONFIG": str(config),
    }
    assert config.is_file()
