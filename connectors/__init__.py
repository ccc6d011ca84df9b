"""I/O with the outside systems, and nothing else: DICOM (pynetdicom), DICOMweb and FHIR (requests, through one
HTTP layer) and PostgreSQL (psycopg2).

Installed as :mod:`riskbridge.connectors`. One module (or package) per system:

- :mod:`.dicom`: associations and the DIMSE services (C-ECHO, C-FIND, C-MOVE, C-GET); :class:`DicomError`.
- :mod:`.query`: typed C-FIND queries for studies, series and instances.
- :mod:`.storescp`: riskbridge's own storage SCP (:class:`StorageSCP`, :class:`InstanceSink`).
- :mod:`.dicomweb`: QIDO-RS and WADO-RS (:class:`DicomwebClient`, :class:`DicomwebError`).
- :mod:`.multipart`: the multipart/related reader and stager of WADO-RS answers.
- :mod:`.part10` and :mod:`.staging`: vetting received DICOM bytes and writing them to the staging area.
- :mod:`.retrieval`: series retrieved into staging over C-MOVE, C-GET or DICOMweb, verified complete
  (:class:`Retriever`, :func:`retrieve_all`, :class:`RetrievalError`).
- :mod:`.fhir`: the FHIR R4 client (:class:`FhirClient`, :class:`FhirError`), split by concern.
- :mod:`.http`: the one HTTP layer (pooled Session, retries honouring ``Retry-After``, TLS, auth headers).
- :mod:`.db`: PostgreSQL connections for the ledger (:class:`DatabaseError`).

Every exception a connector raises on purpose derives from a :mod:`riskbridge.errors` branch: PACS and DICOMweb
failures are ``PacsError``, FHIR failures ``FhirServerError``, unusable DICOM bytes ``DataError``, the ledger
database ``LedgerError``. The names below resolve lazily: importing one connector never imports another's
libraries (pynetdicom, requests, jwt, psycopg2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from riskbridge.lazy import lazy_exports

if TYPE_CHECKING:
    from . import db, dicom, dicomweb, fhir, http, multipart, part10, query, retrieval, staging, storescp
    from .db import DatabaseError
    from .dicom import DicomError
    from .dicomweb import DicomwebClient, DicomwebError
    from .fhir import FhirClient, FhirError
    from .http import HttpTransport, RetryPolicy
    from .multipart import MultipartError, RejectedPartError
    from .part10 import Part10Error
    from .retrieval import RetrievalError, RetrievalFailure, Retriever, retrieve_all
    from .staging import StagingError
    from .storescp import InstanceSink, StorageSCP

_SUBMODULES = frozenset(
    {"db", "dicom", "dicomweb", "fhir", "http", "multipart", "part10", "query", "retrieval", "staging", "storescp"}
)
# Public name -> the submodule that defines it.
_EXPORTS = {
    "DatabaseError": "db",
    "DicomError": "dicom",
    "DicomwebClient": "dicomweb",
    "DicomwebError": "dicomweb",
    "FhirClient": "fhir",
    "FhirError": "fhir",
    "HttpTransport": "http",
    "InstanceSink": "storescp",
    "MultipartError": "multipart",
    "Part10Error": "part10",
    "RejectedPartError": "multipart",
    "RetrievalError": "retrieval",
    "RetrievalFailure": "retrieval",
    "Retriever": "retrieval",
    "RetryPolicy": "http",
    "StagingError": "staging",
    "StorageSCP": "storescp",
    "retrieve_all": "retrieval",
}

__all__ = [
    "DatabaseError",
    "DicomError",
    "DicomwebClient",
    "DicomwebError",
    "FhirClient",
    "FhirError",
    "HttpTransport",
    "InstanceSink",
    "MultipartError",
    "Part10Error",
    "RejectedPartError",
    "RetrievalError",
    "RetrievalFailure",
    "Retriever",
    "RetryPolicy",
    "StagingError",
    "StorageSCP",
    "db",
    "dicom",
    "dicomweb",
    "fhir",
    "http",
    "multipart",
    "part10",
    "query",
    "retrieval",
    "retrieve_all",
    "staging",
    "storescp",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=_SUBMODULES)
