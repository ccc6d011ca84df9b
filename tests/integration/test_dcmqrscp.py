"""The imaging path against dcmtk's dcmqrscp: a PACS that answers only what a strict PACS answers.

Only the sandbox's dcmqrscp part is brought up (its own port; Orthanc, HAPI and PostgreSQL are not needed). A small
synthetic cohort is C-STOREd into it; riskbridge's queries and retrievals then run against it with the PACS settings
of :func:`riskbridge.dev.sandbox.dcmqrscp_pacs`. Several tests assert what dcmqrscp does *not* return: that is what
this PACS is for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from riskbridge.connectors import dicom, query
from riskbridge.connectors.retrieval import RetrievalError, Retriever, resolve_transport
from riskbridge.dev.sandbox import RLE_LOSSLESS, Sandbox, dcmqrscp_pacs
from riskbridge.dev.synth import LoadReport, generate, load_dicom_into, read_truth
from riskbridge.settings import PacsSettings, Settings, load_settings

pytestmark = pytest.mark.integration

# Return keys dcmqrscp's index does not hold: it leaves them out of its answers (not even empty).
STUDY_KEYS_NOT_RETURNED = ("ModalitiesInStudy", "NumberOfStudyRelatedInstances", "TimezoneOffsetFromUTC")
# At SERIES level it answers the UIDs, Modality and SeriesNumber only: every other key riskbridge asks for is left out.
SERIES_KEYS_NOT_RETURNED = tuple(
    key for key in query.SERIES_RETURN_KEYS if key not in ("SeriesInstanceUID", "Modality", "SeriesNumber")
)
IMAGE_KEYS_NOT_RETURNED = ("SOPClassUID", "ImageType", "SliceThickness", "ConvolutionKernel", "Rows")


@pytest.fixture(scope="module")
def qr() -> Iterator[Settings]:
    """Start only the sandbox dcmqrscp (left running if it already was); yield settings whose ``pacs`` is it."""
    settings = load_settings()
    box = Sandbox(settings)
    was_running = box.dcmqrscp.running_pid() is not None
    box.up(only=["dcmqrscp"])
    yield settings.model_copy(update={"pacs": dcmqrscp_pacs(settings)})
    if not was_running:
        box.dcmqrscp.stop()


@pytest.fixture(scope="module")
def loaded(qr: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadReport]:
    """A 3-patient cohort (fixed seed: the same UIDs every run) C-STOREd into the dcmqrscp; the first load's report."""
    out = tmp_path_factory.mktemp("dcmqrscp") / "cohort"
    generate(out, patients=3, seed=23)
    # A short DIMSE timeout: a C-STORE response pynetdicom loses (see load_dicom_into) then costs 10 s, not 30.
    return out, load_dicom_into(qr.pacs, out, timeout_s=10.0)


@pytest.fixture(scope="module")
def truth(loaded: tuple[Path, LoadReport]) -> list[dict[str, Any]]:
    """The ground truth of the loaded cohort."""
    return read_truth(loaded[0])


def _source_files(cohort: Path, study_uid: str, series_uid: str) -> dict[str, Path]:
    return {path.stem: path for path in (cohort / "dicom" / study_uid / series_uid).glob("*.dcm")}


def _thin_lung(truth: list[dict[str, Any]]) -> tuple[str, str, int]:
    study = truth[0]["index_study"]
    series = next(series for series in study["series"] if series["kind"] == "thin_lung")
    return study["study_uid"], series["uid"], series["instances"]


def test_echo_and_only_known_calling_ae_titles(qr: Settings) -> None:
    assert dicom.echo(qr.pacs) < 5.0
    stranger = qr.pacs.model_copy(update={"calling_ae": "STRANGER"})
    # dcmqrscp refuses an unknown *calling* AE title: usually an A-ASSOCIATE-RJ ("called AE title not recognized"),
    # sometimes (its forked child gone first) an abort of the association. Either way no association is made.
    with pytest.raises(
        dicom.DicomError, match=r"STRANGER -> DCMQRSCP@127\.0\.0\.1:\d+: association (rejected|aborted by the peer)"
    ):
        dicom.echo(stranger)


def test_loading_stores_every_instance_once(qr: Settings, loaded: tuple[Path, LoadReport]) -> None:
    cohort, first = loaded
    total = len(list((cohort / "dicom").glob("*/*/*.dcm")))
    assert first.instances_sent == total
    assert first.instances_new + first.instances_already_stored == total  # new on a fresh sandbox dir, else there
    assert "DCMQRSCP@127.0.0.1" in first.describe()
    again = load_dicom_into(qr.pacs, cohort, timeout_s=10.0)
    assert (again.instances_sent, again.instances_new, again.instances_already_stored) == (total, 0, total)


def test_study_level_answers_lack_modalities_counts_and_the_utc_offset(
    qr: Settings, truth: list[dict[str, Any]]
) -> None:
    for record in truth:
        study = record["index_study"]
        answers = list(query.find_studies(qr.pacs, study_uid=study["study_uid"], modality=None))
        assert len(answers) == 1
        found = answers[0]
        assert found.accession == study["accession"]
        assert found.patient.patient_id == record["pacs"]["patient_id"]
        assert found.patient.issuer == record["pacs"]["issuer"]
        assert found.patient.birth_date == record["pacs"]["birth_date"]
        assert found.study_datetime is not None
        # What the index does not keep: ModalitiesInStudy, the instance count and the UTC offset the files carry
        # (so the study time comes back naive: local wall time).
        assert found.modalities == ()
        assert found.instance_count is None
        assert found.timezone_offset is None and found.study_datetime.tzinfo is None
        assert found.study_datetime.isoformat() == study["study_time"][:19]


def test_modalities_in_study_is_no_matching_key(qr: Settings, truth: list[dict[str, Any]]) -> None:
    study_uid = truth[0]["index_study"]["study_uid"]
    # A CT study matches "MR": dcmqrscp drops the key it does not support instead of matching on it.
    assert [s.study_uid for s in query.find_studies(qr.pacs, study_uid=study_uid, modality="MR")] == [study_uid]


def test_series_level_answers_hold_only_the_series_identity(qr: Settings, truth: list[dict[str, Any]]) -> None:
    for record in truth:
        study = record["index_study"]
        listed = {series.series_uid: series for series in query.find_series(qr.pacs, study["study_uid"])}
        assert set(listed) == {series["uid"] for series in study["series"]}
        for expected in study["series"]:
            series = listed[expected["uid"]]
            assert series.series_number == expected["number"]
            assert series.modality in ("CT", "SR")
            assert set(series.attributes) == {"StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber"}
            for keyword in SERIES_KEYS_NOT_RETURNED:
                assert series.attributes.get(keyword) is None, keyword
            assert series.description == "" and series.instance_count is None


def test_image_level_answers_list_every_instance_without_its_class_or_header(
    qr: Settings, loaded: tuple[Path, LoadReport], truth: list[dict[str, Any]]
) -> None:
    study_uid, series_uid, count = _thin_lung(truth)
    instances = list(
        query.find_instances(qr.pacs, study_uid, series_uid, keywords=("ImageType", "SliceThickness", "Rows"))
    )
    assert {i.sop_instance_uid for i in instances} == set(_source_files(loaded[0], study_uid, series_uid))
    assert len(instances) == count
    assert sorted(i.instance_number for i in instances) == list(range(1, count + 1))  # type: ignore[type-var]
    for instance in instances:
        assert instance.sop_class_uid is None
        for keyword in IMAGE_KEYS_NOT_RETURNED:
            assert instance.attributes.get(keyword) is None, keyword


def test_completing_a_series_from_image_level_fills_only_the_count(qr: Settings, truth: list[dict[str, Any]]) -> None:
    study_uid, series_uid, count = _thin_lung(truth)
    series = next(s for s in query.find_series(qr.pacs, study_uid) if s.series_uid == series_uid)
    wanted = ["ImageType", "SliceThickness", "ConvolutionKernel", "NumberOfSeriesRelatedInstances"]
    completed = query.complete_series(qr.pacs, series, wanted)
    assert completed.instance_count == count  # counted from the IMAGE-level answers
    # ... but the header attributes selection judges are at no level of dcmqrscp's C-FIND.
    assert [completed.attributes.get(keyword) for keyword in wanted[:3]] == [None, None, None]


def test_auto_transport_is_c_get(qr: Settings) -> None:
    assert resolve_transport(qr.pacs) == "c-get"


@pytest.mark.parametrize("transport", ["c-move", "c-get"])
def test_a_series_is_staged_complete_and_pixel_identical(
    qr: Settings, loaded: tuple[Path, LoadReport], truth: list[dict[str, Any]], tmp_path: Path, transport: str
) -> None:
    study_uid, series_uid, count = _thin_lung(truth)
    with Retriever(qr.pacs, tmp_path / "staging", transport) as retriever:
        result = retriever.retrieve(study_uid, series_uid)
    assert result.complete and (result.expected, result.received, result.attempts) == (count, count, 1)
    staged = {path.stem: path for path in result.path.glob("*.dcm")}
    source = _source_files(loaded[0], study_uid, series_uid)
    assert set(staged) == set(source)
    sample = sorted(staged)[len(staged) // 2]
    received = pydicom.dcmread(staged[sample])
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # as stored: no conversion on the way
    assert received.PixelData == pydicom.dcmread(source[sample]).PixelData


def _rle_instance(loaded: tuple[Path, LoadReport], truth: list[dict[str, Any]]) -> pydicom.Dataset:
    """One instance of the cohort re-encoded as RLE Lossless in a study of its own (UIDs fixed across runs)."""
    study_uid, series_uid, _ = _thin_lung(truth)
    source = sorted(_source_files(loaded[0], study_uid, series_uid).values())[0]
    ds = pydicom.dcmread(source)
    digest = int(hashlib.sha256(f"rle:{series_uid}".encode()).hexdigest()[:24], 16)
    ds.StudyInstanceUID = UID(f"2.25.{digest}")
    ds.SeriesInstanceUID = UID(f"2.25.{digest + 1}")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.{digest + 2}")
    ds.AccessionNumber = "RBRLE0001"
    ds.compress(RLELossless, generate_instance_uid=False)  # pydicom 3 gives it a new random UID otherwise
    return ds


def _store(pacs: PacsSettings, ds: pydicom.Dataset) -> tuple[str, int]:
    ae = dicom.new_ae(pacs.calling_ae, pacs.timeout_s)
    ae.add_requested_context(ds.SOPClassUID, RLELossless)  # RLE only: the PACS must accept it or refuse the context
    assoc = dicom.associate(pacs, (), "C-STORE", pacs.timeout_s, ae=ae)
    try:
        syntax = assoc.accepted_contexts[0].transfer_syntax[0]
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return str(syntax), int(status.Status)


def test_rle_is_stored_but_cannot_be_retrieved_uncompressed(
    qr: Settings, loaded: tuple[Path, LoadReport], truth: list[dict[str, Any]], tmp_path: Path
) -> None:
    ds = _rle_instance(loaded, truth)
    assert _store(qr.pacs, ds) == (RLE_LOSSLESS, 0x0000)
    listed = list(query.find_instances(qr.pacs, ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert [instance.sop_instance_uid for instance in listed] == [ds.SOPInstanceUID]
    # dcmqrscp has no RLE decoder and sends on the first context accepted for the class (uncompressed, which is what
    # riskbridge's storage SCP prefers): every sub-operation fails, and the retrieval says so by its counts.
    once = qr.pacs.model_copy(update={"max_attempts": 1})
    with (
        Retriever(once, tmp_path / "staging", "c-get") as retriever,
        pytest.raises(RetrievalError, match=r"0 of 1 instances after 1 c-get attempt") as caught,
    ):
        retriever.retrieve(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert caught.value.code == "retrieval_incomplete"
