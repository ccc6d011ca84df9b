"""I/O with the outside systems, and nothing else: DICOM (pynetdicom), FHIR (requests) and PostgreSQL (psycopg2).

Installed as :mod:`riskbridge.connectors`.
"""
