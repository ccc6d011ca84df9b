"""Header sampling without a server: the middle instance is sampled, only what C-FIND left out is filled (each
attribute recorded with its source), the mode and the per-study limit are kept, and the sampled header's
OtherPatientIDsSequence reaches identity. The PACS here is a stand-in (an IMAGE-level listing and a retrieval that
writes one real DICOM file into staging); the integration tests run the same path against dcmtk's dcmqrscp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from riskbridge.connectors import query, sampling, staging
from riskbridge.connectors.sampling import HeaderSampler, middle_instance
from riskbridge.harmonize.series import load_default_rules
from riskbridge.records import SeriesRef
from riskbridge.settings import PacsSettings
from riskbridge.stages.select import select_study

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = f"{STUDY}.1"


def _header(sop_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.InstanceNumber = "CT", number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness, ds.ConvolutionKernel = "1.25", "STANDARD"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.PatientID, ds.IssuerOfPatientID = "8528044", "SYNTH_HOSP"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "MRN-0042", "EPIC"
    ds.OtherPatientIDsSequence = Sequence([other])
    return ds


class _Retriever:
    """Stands in for the retrieval transport: 'retrieves' the asked instance by writing its file into staging."""

    fetched: ClassVar[list[str]] = []

    def __init__(self, pacs: PacsSettings, staging_dir: Path, transport: str) -> None:
        self.staging_dir = staging_dir

    def __enter__(self) -> _Retriever:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def fetch_instances(self, study_uid: str, series_uid: str, sop_instance_uids: list[str]) -> set[str]:
        [uid] = sop_instance_uids
        _Retriever.fetched.append(uid)
        path = staging.instance_path(self.staging_dir, study_uid, series_uid, uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        _header(uid, int(uid.rsplit(".", 1)[1])).save_as(path, enforce_file_format=True)
        return {uid}


@pytest.fixture
def pacs(monkeypatch: pytest.MonkeyPatch) -> Iterator[PacsSettings]:
    """A strict PACS: IMAGE-level C-FIND lists the 120 instances with no attribute beyond the keys."""

    def find_instances(pacs: PacsSettings, study_uid: str, series_uid: str, **kwargs: Any) -> Iterator[Any]:
        for number in range(1, 121):
            yield query.InstanceRef(study_uid, series_uid, f"{series_uid}.{number}", CTImageStorage, number)

    def find_series(pacs: PacsSettings, study_uid: str, modality: str | None = None, **kwargs: Any) -> Any:
        yield _strict_series()

    _Retriever.fetched = []
    monkeypatch.setattr(query, "find_instances", find_instances)
    monkeypatch.setattr(query, "find_series", find_series)
    monkeypatch.setattr(sampling, "Retriever", _Retriever)
    yield PacsSettings(transport="c-get")


def _strict_series() -> SeriesRef:
    attributes = {"Modality": "CT", "SeriesNumber": 2, "NumberOfSeriesRelatedInstances": 120}
    return SeriesRef(STUDY, SERIES, "CT", 2, "", 120, attributes, {k: "series" for k in attributes})


def test_the_middle_instance_is_sampled() -> None:
    instances = [query.InstanceRef(STUDY, SERIES, f"{SERIES}.{n}", None, n) for n in (5, 1, 3, 2, 4)]
    chosen = middle_instance(instances)
    assert chosen is not None and chosen.instance_number == 3
    assert middle_instance([]) is None


def test_only_what_the_c_find_left_out_is_filled_from_the_header(pacs: PacsSettings, tmp_path: Path) -> None:
    with HeaderSampler(pacs, tmp_path, "when-needed", limit=4) as sampler:
        completed = sampler.complete(_strict_series(), ["ImageType", "SliceThickness", "Modality"])
    assert completed.attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert completed.attributes["SliceThickness"] == 1.25
    assert completed.sources["ImageType"] == completed.sources["SliceThickness"] == "header"
    assert completed.sources["Modality"] == "series"  # present already: kept, with its source
    assert "ConvolutionKernel" not in completed.attributes  # not wanted: not filled
    assert _Retriever.fetched == [f"{SERIES}.61"]
    assert staging.instance_path(tmp_path, STUDY, SERIES, f"{SERIES}.61").is_file()  # kept for the retrieval
    assert sampler.stats.series == 1 and sampler.stats.filled == {"ImageType": 1, "SliceThickness": 1}


def test_off_and_the_per_study_limit_sample_nothing(pacs: PacsSettings, tmp_path: Path) -> None:
    with HeaderSampler(pacs, tmp_path, "off") as sampler:
        assert sampler.complete(_strict_series(), ["ImageType"]) == _strict_series()
    with HeaderSampler(pacs, tmp_path, "when-needed", limit=1) as sampler:
        sampler.complete(_strict_series(), ["ImageType"])
        assert sampler.complete(_strict_series(), ["SliceThickness"]).attributes.get("SliceThickness") is None
    assert _Retriever.fetched == [f"{SERIES}.61"]  # one sample; and a staged sample is never fetched again
    with pytest.raises(ValueError, match="header sampling mode"):
        HeaderSampler(pacs, tmp_path, "sometimes")  # type: ignore[arg-type]


def test_a_strict_pacs_series_is_selected_on_its_sampled_header(pacs: PacsSettings, tmp_path: Path) -> None:
    rules = load_default_rules("chest_ct")
    without = select_study(pacs, STUDY, rules)
    assert without.selection.chosen is None  # what a strict PACS gives is not enough to choose
    with HeaderSampler(pacs, tmp_path, "when-needed") as sampler:
        study = select_study(pacs, STUDY, rules, sampler)
    assert study.selection.chosen is not None and study.selection.chosen.series_uid == SERIES
    assert study.sampled_series == 1 and study.expected == 120
    assert study.sources[SERIES]["ImageType"] == "header"


def test_the_sampled_header_gives_identity_the_other_patient_ids(pacs: PacsSettings, tmp_path: Path) -> None:
    with HeaderSampler(pacs, tmp_path, "when-needed") as sampler:
        patient = sampler.study_patient(STUDY)
    assert patient is not None
    assert (patient.patient_id, patient.issuer, patient.other_ids) == ("8528044", "SYNTH_HOSP", (("MRN-0042", "EPIC"),))
    with HeaderSampler(pacs, tmp_path, "off") as sampler:
        assert sampler.study_patient(STUDY) is None
