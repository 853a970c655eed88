"""A tiny hospital archive: DICOM files with identifiers in every header field that DICOM PS3.15 Annex E lists
as identifying (those a radiograph commonly carries) and in their folder and file names, stored the way PACS
exports store them (``DOE_JANE_MRN12345678/20240315_ACC90001/DOE_JANE_001.dcm``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

# (surname, given name, MRN, birth date, accession, study date)
PATIENTS = (
    ("DOE", "JANE", "MRN12345678", "19450817", "ACC90001", "20240315"),
    ("ROE", "RICHARD", "MRN87654321", "19521103", "ACC90002", "20231122"),
    ("POE", "EDGARA", "MRN55501234", "19690209", "ACC90003", "20220704"),
)
IMAGES_PER_PATIENT = 4
SHARED = {
    "InstitutionName": "SAINT ELSEWHERE GENERAL",
    "InstitutionAddress": "12 Hospital Lane, Springfield",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PerformingPhysicianName": "QUINN^MICHAELA",
    "OperatorsName": "WELBY^MARCUS",
    "StationName": "XRAYROOM7",
    "DeviceSerialNumber": "SN-XR-448812",
}


def _identifiers(p: tuple[str, ...], k: int) -> dict[str, str]:
    """The identifying header values of image ``k`` of patient ``p``."""
    surname, given, mrn, birth, accession, study_date = p
    n = PATIENTS.index(p)
    return {
        **SHARED,
        "PatientName": f"{surname}^{given}",
        "PatientID": mrn,
        "OtherPatientIDs": f"ALT{mrn[3:]}",
        "PatientBirthDate": birth,
        "PatientAddress": f"{n + 7} Elm Street, Springfield",
        "PatientTelephoneNumbers": f"555-01{n}{n}",
        "AccessionNumber": accession,
        "StudyDate": study_date,
        "SeriesDate": study_date,
        "ContentDate": study_date,
        "AcquisitionDateTime": f"{study_date}101530.123456",
        "StudyTime": "101530.123456",
        "StudyID": f"STUDY{accession[3:]}",
        "StudyDescription": f"CHEST PA {surname} FOLLOWUP",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.9.7777.{n}",
        "SeriesInstanceUID": f"1.2.826.0.1.3680043.9.7777.{n}.1",
        "SOPInstanceUID": f"1.2.826.0.1.3680043.9.7777.{n}.1.{k}",
        "FrameOfReferenceUID": f"1.2.826.0.1.3680043.9.7777.{n}.9",
    }


def write_dicom(path: Path, idents: dict[str, str], seed: int, burned_in: bool = False) -> None:
    """A 48x64 MONOCHROME2 radiograph-like file (a bright blob on noise) carrying ``idents``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :64]
    blob = 3000 * np.exp(-((yy - 10 - seed % 20) ** 2 + (xx - 20 - seed % 30) ** 2) / 150)
    pixels = (blob + rng.integers(0, 400, (48, 64))).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    for keyword, value in idents.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 48, 64, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_archive(root: Path) -> tuple[list[str], dict[str, str]]:
    """The archive under ``root``: (every identifier written, in headers and in names; file -> raw patient id).
    The last image of the first patient says BurnedInAnnotation YES."""
    secrets, owner = [str(root)], {}
    for p in PATIENTS:
        surname, given, mrn, _, accession, study_date = p
        folder = root / f"{surname}_{given}_{mrn}" / f"{study_date}_{accession}"
        for k in range(IMAGES_PER_PATIENT):
            path = folder / f"{surname}_{given}_{k:03d}.dcm"
            idents = _identifiers(p, k)
            burned = p is PATIENTS[0] and k == IMAGES_PER_PATIENT - 1
            write_dicom(path, idents, seed=len(owner), burned_in=burned)
            owner[str(path.relative_to(root))] = mrn
            secrets += [str(path.relative_to(root)), path.stem, folder.parent.name, folder.name]
            secrets += [v for v in idents.values() if len(v) >= 6]
            secrets += [idents["PatientName"].replace("^", " "), f"{surname}_{given}", idents["PatientName"]]
    return sorted(set(secrets)), owner
