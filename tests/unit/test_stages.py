"""The stage list: every stage is one module that defines what a stage must, and the one ordered list drives the
pipeline, the DAG factory and the CLI. A stage added as one module plus one line runs in its place (the worked
example of docs/architecture.md, here with an in-memory module and a stand-in ledger)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import riskbridge.stages
from riskbridge import pipeline as pipeline_module
from riskbridge.pipeline import Pipeline
from riskbridge.settings import Settings
from riskbridge.stages import STAGE_NAMES, STAGES, Stage, stage
from riskbridge.stages.base import StageContext, chunk_key, chunked


def test_every_stage_is_a_module_defining_work_and_counts() -> None:
    assert STAGE_NAMES == ("discover", "match", "select", "retrieve", "clinical", "harmonize", "score", "write_back")
    for current in STAGES:
        module = current.module
        assert module.__name__ == f"riskbridge.stages.{current.name}"
        assert callable(module.work) and callable(module.counts)
        assert callable(getattr(module, "pending_items", None)) == current.chunked
    assert [s.name for s in STAGES if s.chunked] == ["retrieve", "clinical"]
    assert stage("retrieve").chunk_size(Settings().run) == Settings().run.retrieve_chunk_size


def test_an_unknown_stage_or_an_incomplete_module_is_refused() -> None:
    with pytest.raises(ValueError, match="no stage 'scoring'; the stages are discover, match"):
        stage("scoring")
    with pytest.raises(TypeError, match=r"riskbridge\.stages\.base lacks work, counts"):
        _ = Stage("base").module
    with pytest.raises(ValueError, match="not chunked"):
        stage("score").chunk_size(Settings().run)


def test_chunks_keep_order_and_a_chunk_is_named_by_its_items() -> None:
    assert chunked(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert chunked([], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        chunked(["a"], 0)
    assert chunk_key(["b", "a"]) == chunk_key(["a", "b"]) != chunk_key(["a"])
    assert chunk_key(None) == "all"


class _Ledger:
    """Stands in for the ledger's run bookkeeping: the stages here keep their state in the module."""

    def __init__(self) -> None:
        self.timings: list[tuple[int, str, str, Mapping[str, int]]] = []

    def resume_run(self, run_id: int) -> bool:
        return False

    def record_timing(self, run_id: int, stage: str, chunk: str, seconds: float, counts: Mapping[str, int]) -> None:
        self.timings.append((run_id, stage, chunk, dict(counts)))

    def close(self) -> None:
        pass


@pytest.fixture
def audit_stage(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A new stage ``audit`` after ``harmonize``: one module (in memory here) plus one line in the stage list."""
    calls: list[str] = []
    module = types.ModuleType("riskbridge.stages.audit")

    def work(context: StageContext, run_id: int, items: Sequence[str] | None, progress: Any) -> Counter[str]:
        calls.append("audit")
        return Counter(done=3)

    def counts(cursor: Any, run_id: int) -> Counter[str]:
        return Counter(done=3)

    module.work = work  # type: ignore[attr-defined]
    module.counts = counts  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "riskbridge.stages.audit", module)
    names = list(STAGE_NAMES)
    extended = (*STAGES[: names.index("harmonize") + 1], Stage("audit"), *STAGES[names.index("harmonize") + 1 :])
    monkeypatch.setattr(riskbridge.stages, "STAGES", extended)
    monkeypatch.setattr(pipeline_module, "STAGES", extended)
    # Every other stage records that it ran and does nothing else.
    for current in STAGES:

        def other(context: Any, run_id: int, items: Any, progress: Any, name: str = current.name) -> Counter[str]:
            calls.append(name)
            return Counter()

        monkeypatch.setattr(current.module, "work", other)
        if current.chunked:
            monkeypatch.setattr(current.module, "pending_items", lambda context, run_id: [])
        if hasattr(current.module, "warm_up"):  # no spaCy here: the warm-up is tested on its own below
            monkeypatch.setattr(current.module, "warm_up", lambda context: None)
    yield calls


def test_a_stage_warms_up_on_a_thread_while_the_stage_before_it_runs_and_is_waited_for(
    audit_stage: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    seen: list[tuple[str, bool]] = []

    def warm_up(context: StageContext) -> None:
        seen.append(("warm audit", threading.current_thread() is threading.main_thread()))
        started.set()
        time.sleep(0.2)  # still warming when harmonize ends: audit's work must wait for it
        seen.append(("warmed audit", False))

    def harmonize(context: Any, run_id: int, items: Any, progress: Any) -> Counter[str]:
        assert started.wait(5), "the warm-up runs while the stage before it runs"
        seen.append(("harmonize", True))
        return Counter()

    def audit(context: Any, run_id: int, items: Any, progress: Any) -> Counter[str]:
        seen.append(("audit", True))
        return Counter()

    monkeypatch.setattr(stage("audit").module, "warm_up", warm_up, raising=False)
    monkeypatch.setattr(stage("harmonize").module, "work", harmonize)
    monkeypatch.setattr(stage("audit").module, "work", audit)
    Pipeline(Settings(), ledger=_Ledger()).run_stages(7, until="audit")  # type: ignore[arg-type]
    assert seen == [("warm audit", False), ("harmonize", True), ("warmed audit", False), ("audit", True)]


def test_a_failed_warm_up_is_logged_and_the_stage_still_runs(
    audit_stage: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def warm_up(context: StageContext) -> None:
        raise OSError("rule file unreadable")

    monkeypatch.setattr(stage("audit").module, "warm_up", warm_up, raising=False)
    with caplog.at_level(logging.WARNING, logger="riskbridge.pipeline"):
        results = Pipeline(Settings(), ledger=_Ledger()).run_stages(7, until="audit")  # type: ignore[arg-type]
    assert results[-1].stage == "audit" and results[-1].done == 3
    assert "warming up the audit stage failed" in caplog.text


def test_a_stage_added_as_one_module_and_one_line_runs_in_its_place(audit_stage: list[str]) -> None:
    ledger = _Ledger()
    pipeline = Pipeline(Settings(), ledger=ledger)  # type: ignore[arg-type]
    results = pipeline.run_stages(7, until="score")
    assert audit_stage == ["discover", "match", "select", "harmonize", "audit", "score"]  # no chunks: not called
    assert [r.stage for r in results] == ["discover", "match", "select", "harmonize", "audit", "score"]
    assert next(r for r in results if r.stage == "audit").done == 3
    assert ("audit", "all") in {(t[1], t[2]) for t in ledger.timings}
    assert stage("audit").module.counts(None, 7)["done"] == 3


def test_a_pinned_model_sha256_is_checked_before_anything_is_judged_or_scored() -> None:
    from riskbridge.model.package import ModelPackageError, read_package_info, reference_package_path
    from riskbridge.settings import RunSettings, Settings
    from riskbridge.stages.base import StageContext

    actual = read_package_info(reference_package_path()).sha256
    pinned = StageContext(Settings(run=RunSettings(model_sha256=actual)))
    assert pinned.package_info().sha256 == actual
    wrong = StageContext(Settings(run=RunSettings(model_sha256="0" * 64)))
    with pytest.raises(ModelPackageError, match="is not the expected 000000000000"):
        wrong.package_info()


class _RetrieveLedger:
    """Stands in for the ledger of the retrieve stage: one chosen series pending; records every statement."""

    def __init__(self, study_uid: str, series_uid: str) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        self.pending = [{"study_uid": study_uid, "chosen_series_uid": series_uid, "expected_instances": 64}]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_RetrieveLedger]:
        yield self

    @contextlib.contextmanager
    def claim_series(self, series_uids: Sequence[str]) -> Iterator[None]:
        yield

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self.statements.append((" ".join(sql.split()), params))

    def fetchall(self) -> list[dict[str, Any]]:
        return self.pending


def test_a_full_staging_disk_quarantines_the_study_staging_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging filesystem's free space is faked (shutil.disk_usage): a real disk cannot be made full on demand in
    a unit test. Nothing is fetched; the study is quarantined with the code and a detail that names no UID."""
    import shutil

    from riskbridge.connectors.retrieval import Retriever
    from riskbridge.records import uid_hash
    from riskbridge.settings import PacsSettings
    from riskbridge.stages import retrieve

    study_uid, series_uid = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"
    usage = types.SimpleNamespace(total=2**40, used=2**40 - 2**29, free=2**29)  # 512 MiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(Retriever, "_fetch", lambda *a: pytest.fail("nothing is fetched when the disk is short"))
    ledger = _RetrieveLedger(study_uid, series_uid)
    settings = Settings(pacs=PacsSettings(transport="c-get", workers=1), staging_dir=tmp_path)
    counted = retrieve.work(StageContext(settings, ledger), 7, None, None)  # type: ignore[arg-type]
    assert counted == Counter(failed=1)
    [quarantine] = [params for sql, params in ledger.statements if sql.startswith("INSERT INTO quarantine")]
    assert quarantine[:4] == (7, study_uid, "retrieve", "staging_disk_full")
    assert quarantine[4].startswith(f"series {uid_hash(series_uid)}: staging has 512 MiB free")
    assert series_uid not in quarantine[4]
    [failure] = [params for sql, params in ledger.statements if sql.startswith("INSERT INTO retrievals")]
    assert failure[4] == "staging_disk_full"
