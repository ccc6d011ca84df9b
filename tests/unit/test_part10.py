"""Part 10 bytes for the storage SCP: Study/Series UIDs read from received bytes in any encoding, and file meta
written exactly as pynetdicom writes it."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset

from riskbridge.connectors.part10 import file_preamble, read_file_meta, study_and_series

ENCODINGS = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]


@pytest.mark.parametrize("name", ENCODINGS)
def test_uids_come_from_the_bytes_as_pydicom_reads_them(name: str) -> None:
    data = Path(str(get_testdata_file(name))).read_bytes()
    reference = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    assert study_and_series(data) == (reference.StudyInstanceUID, reference.SeriesInstanceUID)


def test_bytes_that_are_not_a_part10_file_belong_to_no_series() -> None:
    assert study_and_series(b"\x00" * 200) is None


@pytest.mark.parametrize("name", ENCODINGS)
def test_the_file_preamble_is_byte_identical_to_pynetdicoms(name: str) -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import encode_file_meta

    source = pydicom.dcmread(str(get_testdata_file(name)), stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = source.SOPClassUID
    meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    written = file_preamble(source.SOPClassUID, source.SOPInstanceUID, source.file_meta.TransferSyntaxUID)
    assert written == expected
    parsed = read_file_meta(written)
    assert (parsed.sop_instance_uid, parsed.dataset_offset) == (source.SOPInstanceUID, len(written))
