"""DICOM files of the synthetic cohort: CT image series and the X-Ray Radiation Dose SR, written with pydicom.

Every file is Part 10 with Explicit VR Little Endian file meta, at
``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Pixel encodings follow the scanner
profile in cohort.SCANNERS (unsigned 12-bit with intercept -1024, signed with intercept -1024 and a padding
value outside the reconstruction circle, or signed with intercept 0), so readers must apply the rescale.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from riskbridge.dev.synth.cohort import INSTITUTION, PatientSpec, SeriesSpec, StudySpec, make_uid
from riskbridge.dev.synth.phantom import StudyVolumes, render_study

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
XRAY_DOSE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"
IMPLEMENTATION_VERSION = "RISKBRIDGE_SYN1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
WINDOWS = {
    "thin_lung": (-600, 1500),
    "thin_soft": (40, 400),
    "thick_soft": (40, 400),
    "coronal": (40, 400),
    "localizer": (2048, 4096),
}


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def _other_id(value: str, issuer: str) -> Dataset:
    """One item of OtherPatientIDsSequence."""
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = value, issuer
    return item


def _offset(moment: datetime) -> str:
    delta = moment.utcoffset()
    minutes = int(delta.total_seconds() // 60) if delta is not None else 0
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for a float."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _common(patient: PatientSpec, study: StudySpec, series: SeriesSpec, sop_class: str, sop_uid: str | None) -> Dataset:
    scanner = study.scanner
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    if sop_uid is not None:
        ds.SOPInstanceUID = sop_uid
    ds.StudyDate = _da(study.start)
    ds.SeriesDate = _da(series.content_time)
    ds.ContentDate = _da(series.content_time)
    ds.StudyTime = _tm(study.start)
    ds.SeriesTime = _tm(series.content_time)
    ds.ContentTime = _tm(series.content_time)
    ds.AccessionNumber = study.accession
    ds.Modality = "SR" if series.kind == "dose_sr" else "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTHCT01"
    ds.StudyDescription = "CT CHEST W CONTRAST" if study.contrast else "CT CHEST WO CONTRAST"
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = scanner.model
    ds.TimezoneOffsetFromUTC = _offset(study.start)
    ds.PatientName = patient.pacs_name
    ds.PatientID = patient.pacs_patient_id
    if patient.pacs_issuer is not None:
        ds.IssuerOfPatientID = patient.pacs_issuer
    if patient.pacs_other_ids:
        ds.OtherPatientIDsSequence = Sequence([_other_id(value, issuer) for value, issuer in patient.pacs_other_ids])
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age_at(study.start.date()):03d}Y"
    ds.SoftwareVersions = scanner.software
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    return ds


def _image_template(patient: PatientSpec, study: StudySpec, series: SeriesSpec) -> Dataset:
    """The elements every image of the series shares (all but :data:`VARYING`)."""
    scanner = study.scanner
    g = study.geometry
    ds = _common(patient, study, series, CT_IMAGE_STORAGE, None)
    acquired = study.start + (study.acquisition - study.start) * (0.4 if series.kind == "localizer" else 1.0)
    ds.ImageType = list(series.image_type)
    ds.AcquisitionDate = _da(acquired)
    ds.AcquisitionTime = _tm(acquired)
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
    ds.BodyPartExamined = "CHEST"
    if study.contrast:
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "80"
    ds.SliceThickness = _ds(series.thickness_mm or 0.0)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SYN0001"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ReconstructionDiameter = _ds(g.matrix * g.pixel_mm)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 40 if series.kind == "localizer" else 180
    ds.ConvolutionKernel = series.kernel or ""
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    axial = series.kind in ("thin_lung", "thin_soft", "thick_soft")
    ds.ImageOrientationPatient = [_ds(v) for v in (AXIAL if axial else CORONAL)]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if axial:
        ds.Rows = ds.Columns = g.matrix
        ds.PixelSpacing = [_ds(g.pixel_mm), _ds(g.pixel_mm)]
    else:
        ds.Rows, ds.Columns = g.n_thin, g.matrix
        ds.PixelSpacing = [_ds(g.thin_mm), _ds(g.pixel_mm)]
    ds.BitsAllocated = 16
    if series.kind == "localizer" or not scanner.signed:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        if scanner.padding is not None and series.kind != "coronal":
            ds.PixelPaddingValue = scanner.padding
    center, width = WINDOWS[series.kind]
    ds.WindowCenter = str(center)
    ds.WindowWidth = str(width)
    ds.RescaleIntercept = _ds(0.0 if series.kind == "localizer" else scanner.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "US" if series.kind == "localizer" else "HU"
    correct_ambiguous_vr(ds, True)
    return ds


def _stored(hu: np.ndarray, template: Dataset, fov_mask: np.ndarray | None) -> bytes:
    """Pixel bytes for HU values under the template's encoding (the localizer is stored as is)."""
    stored = np.rint(hu - float(template.RescaleIntercept))
    if template.PixelRepresentation == 1:
        values = np.clip(stored, -32768, 32767).astype("<i2")
        if "PixelPaddingValue" in template and fov_mask is not None:
            values[~fov_mask] = template.PixelPaddingValue
        return values.tobytes()
    return np.clip(stored, 0, 4095).astype("<u2").tobytes()


def _varying(
    study: StudySpec, series: SeriesSpec, number: int, position: tuple[float, float, float], data: bytes
) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = make_uid(study.uid, series.uid, number)
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    if series.kind in ("thin_lung", "thin_soft", "thick_soft"):
        ds.SliceLocation = _ds(position[2])
    ds.add(DataElement(0x7FE00010, "OW", data))
    return ds


def _num(name: tuple[str, str, str], value: float, unit: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = Sequence([_code(*name)])
    measured = Dataset()
    measured.NumericValue = _ds(value)
    measured.MeasurementUnitsCodeSequence = Sequence([_code(*unit)])
    item.MeasuredValueSequence = Sequence([measured])
    return item


def _dose_report(patient: PatientSpec, study: StudySpec, series: SeriesSpec) -> Dataset:
    """A minimal TID 10011 CT Radiation Dose report (root container, procedure, accumulated DLP)."""
    ds = _common(patient, study, series, XRAY_DOSE_SR_STORAGE, make_uid(study.uid, series.uid, 1))
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence([])
    ds.PerformedProcedureCodeSequence = Sequence([])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = Sequence([template])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    procedure = Dataset()
    procedure.RelationshipType = "HAS CONCEPT MOD"
    procedure.ValueType = "CODE"
    procedure.ConceptNameCodeSequence = Sequence([_code("121058", "DCM", "Procedure reported")])
    procedure.ConceptCodeSequence = Sequence([_code("77477000", "SCT", "Computed Tomography X-Ray")])
    accumulated = Dataset()
    accumulated.RelationshipType = "CONTAINS"
    accumulated.ValueType = "CONTAINER"
    accumulated.ConceptNameCodeSequence = Sequence([_code("113811", "DCM", "CT Accumulated Dose Data")])
    accumulated.ContinuityOfContent = "SEPARATE"
    accumulated.ContentSequence = Sequence(
        [
            _num(("113812", "DCM", "Total Number of Irradiation Events"), 2, ("{events}", "UCUM", "events")),
            _num(("113813", "DCM", "CT Dose Length Product Total"), study.dlp_mgycm, ("mGy.cm", "UCUM", "mGy.cm")),
        ]
    )
    ds.ContentSequence = Sequence([procedure, accumulated])
    return ds


def _file_meta(ds: Dataset) -> FileMetaDataset:
    return _file_meta_for(ds.SOPClassUID, ds.SOPInstanceUID)


def _file_meta_for(sop_class: str, sop_instance: str) -> FileMetaDataset:
    """File meta (Explicit VR Little Endian) for one SOP instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _encode_element(element: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, element, ["ISO_IR 100"])
    return fp.getvalue()


class SeriesEncoder:
    """Encodes a series' shared elements once; each instance then only encodes its varying elements.

    :meth:`encode` gives the same bytes as ``pydicom.dcmwrite(..., enforce_file_format=True)`` of
    :meth:`dataset` (a unit test checks this) at a fraction of the cost.
    """

    def __init__(self, template: Dataset) -> None:
        """Cache the encoded bytes of every element of ``template``."""
        self.template = template
        self._encoded = {int(element.tag): _encode_element(element) for element in template}

    def dataset(self, varying: Dataset) -> Dataset:
        """The full dataset of one instance (template plus its varying elements, with file meta)."""
        ds = Dataset()
        ds.update(self.template)
        ds.update(varying)
        ds.file_meta = _file_meta(ds)
        return ds

    def encode(self, varying: Dataset) -> bytes:
        """The Part 10 file bytes of one instance."""
        parts = dict(self._encoded)
        for element in varying:
            parts[int(element.tag)] = _encode_element(element)
        meta = DicomBytesIO()
        meta.is_little_endian = True
        meta.is_implicit_VR = False
        write_file_meta_info(meta, _file_meta_for(self.template.SOPClassUID, varying.SOPInstanceUID))
        body = b"".join(parts[tag] for tag in sorted(parts))
        return b"\x00" * 128 + b"DICM" + meta.getvalue() + body


def _fov_mask(study: StudySpec) -> np.ndarray:
    g = study.geometry
    coords = g.origin_xy + np.arange(g.matrix) * g.pixel_mm
    radius = g.matrix * g.pixel_mm / 2.0
    return (coords[None, :] ** 2 + coords[:, None] ** 2) <= radius * radius


def series_instances(
    patient: PatientSpec, study: StudySpec, series: SeriesSpec, volumes: StudyVolumes
) -> Iterator[tuple[SeriesEncoder | None, Dataset]]:
    """(encoder, varying elements) per image of an image series; (None, full dataset) for the dose SR."""
    if series.kind == "dose_sr":
        report = _dose_report(patient, study, series)
        report.file_meta = _file_meta(report)
        yield None, report
        return
    g = study.geometry
    x0 = g.origin_xy
    encoder = SeriesEncoder(_image_template(patient, study, series))
    template = encoder.template
    fov = _fov_mask(study)
    if series.kind == "localizer":
        data = np.clip(np.rint(volumes.localizer), 0, 4095).astype("<u2").tobytes()
        yield encoder, _varying(study, series, 1, (x0, 0.0, g.z_top), data)
    elif series.kind in ("thin_lung", "thin_soft"):
        volume = volumes.thin_lung if series.kind == "thin_lung" else volumes.thin_soft
        for k in range(g.n_thin):
            data = _stored(volume[k], template, fov)
            yield encoder, _varying(study, series, k + 1, (x0, x0, g.z_of(k)), data)
    elif series.kind == "thick_soft":
        for k in range(g.n_thick):
            z = g.z_top - (k * g.thick_group + (g.thick_group - 1) / 2.0) * g.thin_mm
            data = _stored(volumes.thick_soft[k], template, fov)
            yield encoder, _varying(study, series, k + 1, (x0, x0, z), data)
    elif series.kind == "coronal":
        for j in range(g.n_coronal):
            data = _stored(volumes.coronal[j], template, None)
            yield encoder, _varying(study, series, j + 1, (x0, float(volumes.coronal_y[j]), g.z_top), data)
    else:
        raise ValueError(f"unknown series kind {series.kind!r}")


def write_patient(patient: PatientSpec, root: Path) -> int:
    """Write every DICOM instance of the patient's studies under ``root``; return the number written."""
    written = 0
    for study in patient.studies:
        volumes = render_study(study, patient.nodules)
        for series in study.series:
            folder = root / study.uid / series.uid
            folder.mkdir(parents=True, exist_ok=True)
            for encoder, ds in series_instances(patient, study, series, volumes):
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                if encoder is None:
                    ds.save_as(path, enforce_file_format=True)
                else:
                    path.write_bytes(encoder.encode(ds))
                written += 1
    return written
