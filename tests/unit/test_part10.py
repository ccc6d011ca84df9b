"""Study/Series UIDs read from received bytes (the storage SCP's series-level acceptance), in any encoding."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from riskbridge.connectors.part10 import study_and_series


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]
)
def test_uids_come_from_the_bytes_as_pydicom_reads_them(name: str) -> None:
    data = Path(str(get_testdata_file(name))).read_bytes()
    reference = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    assert study_and_series(data) == (reference.StudyInstanceUID, reference.SeriesInstanceUID)


def test_bytes_that_are_not_a_part10_file_belong_to_no_series() -> None:
    assert study_and_series(b"\x00" * 200) is None
