"""Retrieval from the sandbox Orthanc over C-MOVE and C-GET: complete, verified, retried, and strict about who sends.

dcmtk's storescu plays the stranger (an unexpected AE, an unexpected instance) against riskbridge's storage SCP.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from riskbridge.connectors import staging
from riskbridge.connectors.retrieval import (
    RetrievalError,
    RetrievalFailure,
    Retriever,
    expected_instances,
    resolve_transport,
    retrieve_all,
)
from riskbridge.connectors.storescp import InstanceSink, StorageSCP
from riskbridge.dev.synth import generate, load, read_truth
from riskbridge.records import RetrievedSeries
from riskbridge.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cohort(sandbox: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-patient cohort loaded into the sandbox Orthanc (and HAPI)."""
    out = tmp_path_factory.mktemp("retrieval") / "cohort"
    generate(out, patients=3, seed=23)
    load(out, f"http://127.0.0.1:{sandbox.sandbox.orthanc_http_port}", sandbox.fhir.base_url)
    return out


def _series(cohort: Path, kind: str = "thin_lung") -> list[tuple[str, str, int]]:
    """(study UID, series UID, instance count) of one series kind per patient's index study."""
    found = []
    for record in read_truth(cohort):
        study = record["index_study"]
        for series in study["series"]:
            if series["kind"] == kind:
                found.append((study["study_uid"], series["uid"], series["instances"]))
    return found


def _source_files(cohort: Path, study_uid: str, series_uid: str) -> dict[str, Path]:
    return {path.stem: path for path in (cohort / "dicom" / study_uid / series_uid).glob("*.dcm")}


def _with_pacs(settings: Settings, **pacs: object) -> Settings:
    return settings.model_copy(update={"pacs": settings.pacs.model_copy(update=pacs)})


def _settings(sandbox: Settings, tmp_path: Path, **pacs: object) -> Settings:
    return sandbox.model_copy(
        update={"staging_dir": tmp_path / "staging", "pacs": sandbox.pacs.model_copy(update=pacs)}
    )


@pytest.mark.parametrize("transport", ["c-move", "c-get", "dicomweb"])
def test_series_arrives_complete_and_pixel_identical(
    sandbox: Settings, cohort: Path, tmp_path: Path, transport: str
) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[0]
    with Retriever(settings.pacs, settings.staging_dir, transport) as retriever:
        result = retriever.retrieve(study_uid, series_uid)
    assert isinstance(result, RetrievedSeries) and result.complete
    assert (result.expected, result.received, result.attempts) == (count, count, 1)
    staged = {path.stem: path for path in result.path.glob("*.dcm")}
    source = _source_files(cohort, study_uid, series_uid)
    assert set(staged) == set(source)
    sample = sorted(staged)[len(staged) // 2]
    assert pydicom.dcmread(staged[sample]).PixelData == pydicom.dcmread(source[sample]).PixelData
    assert not list(result.path.glob(".incoming-*"))


def test_an_instance_removed_from_staging_is_fetched_again_alone(
    sandbox: Settings, cohort: Path, tmp_path: Path
) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[1]
    with Retriever(settings.pacs, settings.staging_dir, "c-move") as retriever:
        first = retriever.retrieve(study_uid, series_uid)
        files = sorted(first.path.glob("*.dcm"))
        removed = files[5]
        removed.unlink()
        untouched = {path: path.stat().st_mtime_ns for path in files if path != removed}
        second = retriever.retrieve(study_uid, series_uid)
    assert second.complete and second.received == count and second.attempts == 1
    assert removed.exists()
    # Only the missing instance travelled: every other file is the one written the first time.
    assert {path: path.stat().st_mtime_ns for path in untouched} == untouched


class _FailsOnce(InstanceSink):
    """Fault injection (a real SCP cannot be made to fail one given instance on demand): the 10th C-STORE
    answers 0xA700 once, so the real Orthanc's reaction to a failed sub-operation is what gets tested."""

    stores = 0

    def handle_store(self, event: Any) -> int:
        self.stores += 1
        return 0xA700 if self.stores == 10 else super().handle_store(event)


@pytest.mark.parametrize("transport", ["c-move", "c-get"])
def test_a_failed_sub_operation_is_made_good_by_fetching_only_the_missing(
    sandbox: Settings, cohort: Path, tmp_path: Path, transport: str
) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[2]
    with Retriever(settings.pacs, settings.staging_dir, transport, sink_class=_FailsOnce) as retriever:
        result = retriever.retrieve(study_uid, series_uid)
    assert result.complete and result.received == count
    assert result.attempts == 2  # the first attempt came back short; the second asked for the missing only


def test_a_failed_write_is_a_missing_instance_not_a_lost_one(sandbox: Settings, cohort: Path, tmp_path: Path) -> None:
    settings = _settings(sandbox, tmp_path, max_attempts=1)
    study_uid, series_uid, count = _series(cohort)[0]
    blocked = tmp_path / "staging" / study_uid / series_uid
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the series directory should be")
    with Retriever(settings.pacs, settings.staging_dir, "c-get") as retriever, pytest.raises(RetrievalError) as caught:
        retriever.retrieve(study_uid, series_uid)
    assert caught.value.code == "retrieval_incomplete"
    assert f"0 of {count} instances" in str(caught.value)


def test_nothing_to_do_when_the_series_is_already_staged(sandbox: Settings, cohort: Path, tmp_path: Path) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[0]
    with Retriever(settings.pacs, settings.staging_dir, "c-get") as retriever:
        retriever.retrieve(study_uid, series_uid)
        again = retriever.retrieve(study_uid, series_uid)
    assert again.complete and again.attempts == 0 and again.received == count


def test_unknown_destination_fails_with_counts_not_with_status(sandbox: Settings, cohort: Path, tmp_path: Path) -> None:
    # RISKBRIDGE_SCP7 is not in Orthanc's DicomModalities: Orthanc answers 0xC000 with zero counters.
    settings = _settings(sandbox, tmp_path, max_attempts=2)
    study_uid, series_uid, count = _series(cohort)[0]
    unknown_destination = ("RISKBRIDGE_SCP7", 11199)
    with (
        Retriever(settings.pacs, settings.staging_dir, "c-move", unknown_destination) as retriever,
        pytest.raises(RetrievalError) as caught,
    ):
        retriever.retrieve(study_uid, series_uid)
    assert caught.value.code == "retrieval_incomplete"
    assert f"0 of {count} instances after 2 c-move attempt(s)" in str(caught.value)
    assert "0xC000" in str(caught.value)
    assert series_uid not in str(caught.value)  # UIDs are hashed in messages


def test_parallel_workers_retrieve_every_series(sandbox: Settings, cohort: Path, tmp_path: Path) -> None:
    settings = _settings(sandbox, tmp_path, workers=2)
    wanted = [(study, series) for study, series, _ in _series(cohort)] + [("1.2.3.4", "1.2.3.4.5")]
    results = retrieve_all(settings.pacs, settings.staging_dir, wanted, transport="c-move")
    assert [(r.study_uid, r.series_uid) for r in results] == wanted
    assert all(isinstance(r, RetrievedSeries) and r.complete for r in results[:-1])
    failure = results[-1]
    assert isinstance(failure, RetrievalFailure) and failure.code == "series_empty"


def test_auto_picks_the_fastest_transport_the_pacs_offers(sandbox: Settings) -> None:
    # The sandbox Orthanc serves DICOMweb; without a DICOMweb URL it still accepts C-GET from RISKBRIDGE.
    assert resolve_transport(sandbox.pacs) == "dicomweb"
    assert resolve_transport(_with_pacs(sandbox, dicomweb_url=None).pacs) == "c-get"
    assert resolve_transport(_with_pacs(sandbox, transport="c-move").pacs) == "c-move"


def test_expected_instances_come_from_image_level_c_find(sandbox: Settings, cohort: Path) -> None:
    study_uid, series_uid, _ = _series(cohort)[0]
    assert expected_instances(sandbox.pacs, study_uid, series_uid) == set(_source_files(cohort, study_uid, series_uid))


def _storescu(port: int, calling_ae: str, called_ae: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_scp_refuses_unknown_ae_and_unrequested_instances(cohort: Path, tmp_path: Path) -> None:
    study_uid, series_uid, _ = _series(cohort)[0]
    files = sorted(_source_files(cohort, study_uid, series_uid).items())
    staging_root = tmp_path / "staging"
    sink = InstanceSink(staging_root, allowed_calling_aes=frozenset({"ORTHANC"}))
    sink.expect(study_uid, series_uid, [files[0][0]])
    with StorageSCP("RB_TEST_SCP", 11190, sink):
        stranger = _storescu(11190, "STRANGER", "RB_TEST_SCP", files[0][1])
        unrequested = _storescu(11190, "ORTHANC", "RB_TEST_SCP", files[1][1])
        requested = _storescu(11190, "ORTHANC", "RB_TEST_SCP", files[0][1])
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
    assert unrequested.returncode != 0 and "error: cannotunderstand" in unrequested.stderr.lower()  # 0xC000
    assert [refusal.reason for refusal in sink.refusals] == ["instance was not requested"]
    assert requested.returncode == 0, requested.stderr
    staged = sorted(path.name for path in staging_root.rglob("*.dcm"))
    assert staged == [f"{files[0][0]}.dcm"]
    received = pydicom.dcmread(staging_root / study_uid / series_uid / staged[0])
    assert received.PixelData == pydicom.dcmread(files[0][1]).PixelData


def test_dicomweb_workers_are_threads_and_keep_the_order(sandbox: Settings, cohort: Path, tmp_path: Path) -> None:
    settings = _settings(sandbox, tmp_path, workers=3)
    wanted = [(study, series) for study, series, _ in _series(cohort)] + [("1.2.3.4", "1.2.3.4.5")]
    seen: list[int] = []
    results = retrieve_all(
        settings.pacs,
        settings.staging_dir,
        wanted,
        transport="dicomweb",
        progress=lambda done, total: seen.append(done),
    )
    assert [(r.study_uid, r.series_uid) for r in results] == wanted
    assert all(isinstance(r, RetrievedSeries) and r.complete and r.transport == "dicomweb" for r in results[:-1])
    assert isinstance(results[-1], RetrievalFailure) and results[-1].code == "series_empty"
    assert seen == [1, 2, 3, 4]


def _counted_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each IMAGE-level listing (QIDO-RS or C-FIND) the retriever asks for, by series UID."""
    listed: list[str] = []
    original = Retriever._listing

    def listing(self: Retriever, study_uid: str, series_uid: str) -> set[str]:
        listed.append(series_uid)
        return original(self, study_uid, series_uid)

    monkeypatch.setattr(Retriever, "_listing", listing)
    return listed


@pytest.mark.parametrize("transport", ["c-move", "c-get", "dicomweb"])
def test_with_a_known_count_a_whole_answer_of_that_many_instances_stands_for_the_listing(
    sandbox: Settings, cohort: Path, tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request, no listing: the answer's own instances, as many as the SERIES-level count, prove the series.
    A file an earlier attempt left under a UID the answer lacks stands in for nothing: it is removed and counted.
    A series already staged has no answer to go by, so it is listed."""
    settings = _settings(sandbox, tmp_path)
    listed = _counted_listings(monkeypatch)
    study_uid, series_uid, count = _series(cohort)[1]
    stale = staging.instance_path(settings.staging_dir, study_uid, series_uid, "1.2.826.0.1.3680043.8.498.999")
    staging.write_atomic(stale, [b"a stale instance"])
    with Retriever(settings.pacs, settings.staging_dir, transport) as retriever:
        result = retriever.retrieve(study_uid, series_uid, count)
        assert listed == []
        again = retriever.retrieve(study_uid, series_uid, count)
    assert (result.expected, result.received, result.attempts, result.unlisted) == (count, count, 1, 1)
    assert {path.stem for path in result.path.glob("*.dcm")} == set(_source_files(cohort, study_uid, series_uid))
    assert again.attempts == 0 and again.complete and again.unlisted == 0
    assert listed == [series_uid]


@pytest.mark.parametrize("transport", ["c-move", "c-get", "dicomweb"])
def test_an_answer_that_disagrees_with_the_count_is_judged_by_the_listing(
    sandbox: Settings, cohort: Path, tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count that no longer holds (an instance deleted since selection's C-FIND) proves nothing: the series is
    listed, and complete with what the listing names."""
    settings = _settings(sandbox, tmp_path)
    listed = _counted_listings(monkeypatch)
    study_uid, series_uid, count = _series(cohort)[0]
    with Retriever(settings.pacs, settings.staging_dir, transport) as retriever:
        result = retriever.retrieve(study_uid, series_uid, count + 1)
    assert listed == [series_uid]
    assert result.complete and (result.expected, result.received, result.attempts) == (count, count, 1)


@pytest.mark.parametrize("transport", ["c-move", "c-get"])
def test_a_short_count_retrieval_lists_the_series_and_fetches_only_the_rest(
    sandbox: Settings, cohort: Path, tmp_path: Path, transport: str
) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[2]
    with Retriever(settings.pacs, settings.staging_dir, transport, sink_class=_FailsOnce) as retriever:
        result = retriever.retrieve(study_uid, series_uid, count)
    assert result.complete and (result.expected, result.received, result.attempts) == (count, count, 2)


def test_a_partly_staged_series_with_a_known_count_fetches_only_what_is_missing(
    sandbox: Settings, cohort: Path, tmp_path: Path
) -> None:
    settings = _settings(sandbox, tmp_path)
    study_uid, series_uid, count = _series(cohort)[0]
    with Retriever(settings.pacs, settings.staging_dir, "c-move") as retriever:
        first = retriever.retrieve(study_uid, series_uid, count)
        files = sorted(first.path.glob("*.dcm"))
        for path in files[:3]:
            path.unlink()
        untouched = {path: path.stat().st_mtime_ns for path in files[3:]}
        second = retriever.retrieve(study_uid, series_uid, count)
    assert second.complete and second.attempts == 1 and second.received == count
    assert {path: path.stat().st_mtime_ns for path in untouched} == untouched


def test_series_acceptance_refuses_an_instance_of_another_series(cohort: Path, tmp_path: Path) -> None:
    (study_a, series_a, _), (study_b, series_b, _) = _series(cohort)[:2]
    sink = InstanceSink(tmp_path / "staging", allowed_calling_aes=frozenset({"ORTHANC"}))
    sink.expect_series(study_a, series_a)
    mine = sorted(_source_files(cohort, study_a, series_a).values())[0]
    other = sorted(_source_files(cohort, study_b, series_b).values())[0]
    with StorageSCP("RB_TEST_SCP", 11191, sink):
        accepted = _storescu(11191, "ORTHANC", "RB_TEST_SCP", mine)
        refused = _storescu(11191, "ORTHANC", "RB_TEST_SCP", other)
    assert accepted.returncode == 0, accepted.stderr
    assert refused.returncode != 0 and [r.reason for r in sink.refusals] == ["instance was not requested"]
    assert [path.parent.name for path in (tmp_path / "staging").rglob("*.dcm")] == [series_a]
