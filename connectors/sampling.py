"""Header sampling: what a PACS's C-FIND leaves out, read from the header of one retrieved instance.

A strict PACS answers C-FIND with the standard query keys only: at SERIES level Modality, SeriesNumber,
SeriesInstanceUID and perhaps SeriesDescription and NumberOfSeriesRelatedInstances, with ImageType, SliceThickness,
ConvolutionKernel or ImageOrientationPatient empty even at IMAGE level, and no OtherPatientIDsSequence at STUDY
level. :class:`HeaderSampler` fetches one instance of a series (the middle one by InstanceNumber, from an
IMAGE-level listing) over the retrieval transport into the staging area, reads its header without pixel data, and
fills what the caller needs: series attributes for the selection rules (:meth:`HeaderSampler.complete`), the
patient's other identifiers for identity matching (:meth:`HeaderSampler.study_patient`). The sampled instance
stays staged, so it counts toward its series' retrieval if the series is chosen.

A mode bounds it (``[pacs] header_sampling``): ``off``; ``when-needed`` (only attributes the C-FIND did not give);
``always`` (every candidate series is sampled, and header values replace C-FIND values); and a per-study limit of
sampled series (``header_sample_limit``). Nothing identifying is logged: series appear by
:func:`~riskbridge.records.uid_hash` only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydicom.dataset import Dataset

from riskbridge.connectors import query, staging
from riskbridge.connectors.retrieval import Retriever, resolve_transport
from riskbridge.errors import PacsError
from riskbridge.records import PacsPatient, SeriesRef, uid_hash
from riskbridge.settings import PacsSettings

LOG = logging.getLogger(__name__)

SamplingMode = Literal["off", "when-needed", "always"]
SAMPLING_MODES: tuple[SamplingMode, ...] = ("off", "when-needed", "always")
HEADER = "header"  # the source of an attribute read from a sampled header


class SamplingError(PacsError):
    """No instance of the series could be listed or retrieved to read its header."""


@dataclass
class SamplingStats:
    """What sampling cost: series sampled, instances fetched, wall seconds, attributes filled by keyword."""

    series: int = 0
    seconds: float = 0.0
    filled: Counter[str] = field(default_factory=Counter)


def middle_instance(instances: Collection[query.InstanceRef]) -> query.InstanceRef | None:
    """The middle instance by InstanceNumber (then SOPInstanceUID): a slice of the scan, not a scout or a dose page
    at either end of the series."""
    ordered = sorted(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid))
    return ordered[len(ordered) // 2] if ordered else None


class HeaderSampler:
    """Reads series headers from single retrieved instances, within a mode and a per-study limit.

    A context manager: the retrieval transport (for C-MOVE, riskbridge's storage SCP) is opened on the first sample
    and closed on exit. ``transport`` None resolves ``pacs.transport`` (``auto``: DICOMweb, C-GET, else C-MOVE).
    """

    def __init__(
        self,
        pacs: PacsSettings,
        staging_dir: Path,
        mode: SamplingMode = "when-needed",
        limit: int = 8,
        transport: str | None = None,
    ) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"header sampling mode must be one of {', '.join(SAMPLING_MODES)}, not {mode!r}")
        self.pacs = pacs
        self.staging_dir = staging_dir
        self.mode = mode
        self.limit = limit
        self.transport = transport
        self.stats = SamplingStats()
        self._retriever: Retriever | None = None
        self._per_study: Counter[str] = Counter()

    def __enter__(self) -> HeaderSampler:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the retrieval transport, if one was opened."""
        if self._retriever is not None:
            self._retriever.__exit__(None, None, None)
            self._retriever = None

    def _retrieval(self) -> Retriever:
        if self._retriever is None:
            transport = self.transport or resolve_transport(self.pacs)
            self._retriever = Retriever(self.pacs, self.staging_dir, transport).__enter__()
        return self._retriever

    def header(self, study_uid: str, series_uid: str) -> Dataset:
        """The header (no pixel data) of the series' middle instance, retrieved into staging unless it is there."""
        started = time.perf_counter()
        instances = list(query.find_instances(self.pacs, study_uid, series_uid))
        chosen = middle_instance(instances)
        if chosen is None:
            raise SamplingError(f"series {uid_hash(series_uid)}: the PACS lists no instance to sample")
        path = staging.instance_path(self.staging_dir, study_uid, series_uid, chosen.sop_instance_uid)
        if not path.is_file() and not self._retrieval().fetch_instances(
            study_uid, series_uid, [chosen.sop_instance_uid]
        ):
            raise SamplingError(f"series {uid_hash(series_uid)}: the sampled instance did not arrive")
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        self.stats.series += 1
        self.stats.seconds += time.perf_counter() - started
        self._per_study[study_uid] += 1
        return header

    def allows(self, series: SeriesRef, wanted: Collection[str]) -> bool:
        """True when the mode and the study's limit let this series be sampled for ``wanted``."""
        if self.mode == "off" or self._per_study[series.study_uid] >= self.limit:
            return False
        return self.mode == "always" or bool(wanted)

    def complete(self, series: SeriesRef, wanted: Collection[str]) -> SeriesRef:
        """``series`` with the ``wanted`` attributes it lacks (all of them in ``always`` mode) read from a sampled
        header, each recorded with the source ``header``; unchanged when the mode or the limit says no, or when
        sampling fails (the rules then judge the attribute missing, and the failure is logged)."""
        if not self.allows(series, wanted):
            return series
        try:
            header = self.header(series.study_uid, series.series_uid)
        except (PacsError, OSError) as exc:  # SamplingError is a PacsError
            LOG.warning("series %s: header sampling failed: %s", uid_hash(series.series_uid), exc)
            return series
        found = query.answer_attributes(header)
        attributes = dict(series.attributes)
        sources = dict(series.sources)
        keywords = set(wanted) | (set(found) & set(attributes) if self.mode == "always" else set())
        for keyword in sorted(keywords):
            value = found.get(keyword)
            if value is None or (self.mode != "always" and attributes.get(keyword) is not None):
                continue
            attributes[keyword] = value
            sources[keyword] = HEADER
            self.stats.filled[keyword] += 1
        LOG.info(
            "series %s: %d attribute(s) from a sampled header",
            uid_hash(series.series_uid), sum(1 for k in keywords if sources.get(k) == HEADER),
        )  # fmt: skip
        return replace(series, attributes=attributes, sources=sources)

    def study_patient(self, study_uid: str) -> PacsPatient | None:
        """The patient as the header of one instance of the study gives it (with OtherPatientIDsSequence and
        IssuerOfPatientID, which a strict PACS does not return at STUDY level); None when the mode is off, the
        limit is spent or the study has no series to sample."""
        if self.mode == "off" or self._per_study[study_uid] >= self.limit:
            return None
        series = max(
            query.find_series(self.pacs, study_uid, None),
            key=lambda s: (s.modality == "CT", s.instance_count or 0),
            default=None,
        )
        if series is None:
            return None
        try:
            header = self.header(study_uid, series.series_uid)
        except (PacsError, OSError) as exc:  # SamplingError is a PacsError
            LOG.warning("study %s: header sampling for identity failed: %s", uid_hash(study_uid), exc)
            return None
        return query.study_from_answer(header).patient
