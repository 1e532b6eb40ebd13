"""DICOM PS3.15 privacy, end to end (issue 18): a DICOM whose basic-profile identifying attributes all carry
markers, under a patient-style file name, goes through every API endpoint of ``python app.py`` run as a
real process (uploads live in its private folder, swept after a short time), then SIGTERM. No marker may be
found in any endpoint's output (returned files included), the page, the server's stdout/stderr, the
library on disk, the app's private and temporary folders, or any file written under the system's temporary
folder while the test ran."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from pydicom.data import get_testdata_file

from test_app_private import start_app

CT = get_testdata_file("CT_small.dcm")
TAG = "QZXJW"  # in every identifying text value, in the file name and in the markers below
BIRTH_DATE, UID_ROOT = "19010203", "1.2.826.0.1.3680043.9.7391"
# A date as the DICOM holds it or as a person would read it; the UIDs' root (no float's digits look like it).
MARKERS = [TAG, TAG.lower(), BIRTH_DATE, "1901-02-03", "03.02.1901", "02/03/1901", UID_ROOT]
# PS3.15 Annex E basic profile attributes with text values (D, Z, X, U actions), each set to a marker.
IDENTIFYING = {
    "PatientName": "QZXJWDoe^QZXJohn", "PatientID": "QZXJW-PID-4711", "OtherPatientIDs": "QZXJW-OPID",
    "OtherPatientNames": "QZXJWAlias^Jo", "PatientBirthName": "QZXJWBirth^Name",
    "PatientMotherBirthName": "QZXJWMother", "PatientAddress": "QZXJW 1 Main Street",
    "PatientTelephoneNumbers": "QZXJW5550100", "MilitaryRank": "QZXJW Major",
    "EthnicGroup": "QZXJWETHNIC", "Occupation": "QZXJWBAKER", "AdditionalPatientHistory": "QZXJW history of asthma",
    "PatientComments": "QZXJW comment", "MedicalRecordLocator": "QZXJW-MRL",
    "InstitutionName": "QZXJW General Hospital", "InstitutionAddress": "QZXJW 2 Hospital Road",
    "InstitutionalDepartmentName": "QZXJW Radiology", "ReferringPhysicianName": "QZXJWRef^Doctor",
    "ReferringPhysicianAddress": "QZXJW 3 Clinic Lane", "PerformingPhysicianName": "QZXJWPerf^Doctor",
    "NameOfPhysiciansReadingStudy": "QZXJWReader^Doctor", "OperatorsName": "QZXJWOperator^Tech",
    "PhysiciansOfRecord": "QZXJWRecord^Doctor", "RequestingPhysician": "QZXJWRequest^Doctor",
    "AccessionNumber": "QZXJWACC4711", "StudyID": "QZXJWSTUDY", "StudyDescription": "QZXJW study of John",
    "SeriesDescription": "QZXJW series", "ProtocolName": "QZXJW protocol", "StationName": "QZXJWSTATION",
    "DeviceSerialNumber": "QZXJW-SERIAL", "RequestedProcedureDescription": "QZXJW procedure",
    "PerformedProcedureStepDescription": "QZXJW step", "ImageComments": "QZXJW image comment",
    "BodyPartExamined": "QZXJWBODYPART", "PatientBirthDate": BIRTH_DATE, "StudyDate": BIRTH_DATE,
    "SeriesDate": BIRTH_DATE, "AcquisitionDate": BIRTH_DATE, "ContentDate": BIRTH_DATE,
}
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
UPLOAD_TTL_S = 15  # the app's uploads live this long (under load a call may take seconds to read its upload)

pytestmark = pytest.mark.slow  # the app with the default model in a child process, every endpoint: ~2 min


@pytest.fixture(scope="module")
def marked_dicom(tmp_path_factory) -> Path:
    ds = pydicom.dcmread(CT)
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    for i, keyword in enumerate(UIDS):
        setattr(ds, keyword, f"{UID_ROOT}.{i + 1}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path_factory.mktemp("phi") / f"{TAG}Doe_{TAG}John_{BIRTH_DATE}.dcm"
    ds.save_as(path)
    return path


def leaks(data: bytes) -> list[str]:
    return [m for m in MARKERS if m.encode() in data]


def argument(parameter: dict, k: int, upload: Path) -> object:
    """A value for one endpoint parameter: the marked DICOM wherever a file goes, else the default or,
    for text without one (a sampling rate aside), a unique finding or class name (two for a list)."""
    component = parameter.get("component", "")
    python_type = json.dumps(parameter.get("python_type", {}))
    if component in ("File", "Files", "UploadButton") or "filepath" in python_type:
        return [handle_file(upload)] if "List" in python_type or "list" in python_type else handle_file(upload)
    default = parameter.get("parameter_default") if parameter.get("parameter_has_default") else None
    label = str(parameter.get("label", "")).lower()
    if component == "Textbox" and not default and not any(word in label for word in ("rate", "hz", "window")):
        return f"finding {k}\nnormal {k}" if "one per line" in label else f"finding {k}"
    return default


def call_every_endpoint(client: Client, upload: Path) -> dict[str, str]:
    """Each named endpoint once, adding to the library first and the destructive ones last; every output,
    error messages included, as text, by endpoint."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    order = sorted(api, key=lambda name: (name != "/add_to_library", name in ("/remove_from_library",
                                                                             "/reset_library"), name))
    outputs = {}
    for name in order:
        args = [argument(p, k, upload) for k, p in enumerate(api[name]["parameters"])]
        try:
            outputs[name] = json.dumps(client.predict(*args, api_name=name), default=str)
        except AppError as exc:
            outputs[name] = f"error: {exc}"
    assert "Added **1**" in outputs["/add_to_library"], outputs  # the marked file is in the library
    failed = [name for name, out in outputs.items() if out.startswith("error:")]
    assert sorted(failed) == ["/remove_from_library", "/reset_library"], outputs  # no selection; not allowed
    return outputs


def test_no_identifier_survives_any_endpoint_log_library_or_temp_folder(marked_dicom, tmp_path):
    started, found = time.time(), []  # found: (where, what) of every leak, reported together

    def check(where: str, data: bytes) -> None:
        if leaks(data):
            found.append((where, data[:300] if where.startswith("/") else leaks(data)))

    apptmp = tmp_path / "apptmp"
    apptmp.mkdir()
    proc, url, log = start_app(tmp_path, M3BIND_UPLOAD_TTL=str(UPLOAD_TTL_S), TMPDIR=str(apptmp))
    runtime = tmp_path / "runtime"
    try:
        downloads = tmp_path / "downloads"
        client = Client(url, verbose=False, download_files=str(downloads))
        for name, output in call_every_endpoint(client, marked_dicom).items():
            check(name, output.encode())
        check("the page", (httpx.get(url, timeout=30).text + httpx.get(f"{url}config", timeout=30).text).encode())
        for file in (f for f in downloads.rglob("*") if f.is_file()):  # previews, plots, exports
            check(f"returned file {file.name}", file.read_bytes())
        time.sleep(UPLOAD_TTL_S + UPLOAD_TTL_S / 2 + 5)  # past the uploads' time to live and a sweep
        for file in (f for f in runtime.rglob("*") if f.is_file()):
            check(f"private folder {file.relative_to(runtime)}", file.read_bytes())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    check("server log", log.read_bytes())
    assert not runtime.exists() or not any(runtime.iterdir())
    home = tmp_path / "home"
    assert any(home.rglob("*.sqlite")), "the library was not saved"
    for file in [*home.rglob("*"), *apptmp.rglob("*")]:
        if file.is_file():
            check(str(file.relative_to(tmp_path)), file.read_bytes())
    # anything written under the system's temporary folder meanwhile (this test's input aside)
    for folder, dirs, names in os.walk(tempfile.gettempdir()):
        for name in names:
            file = Path(folder, name)
            try:
                info = file.stat()
                if info.st_mtime < started or info.st_size > 50 << 20 or file == marked_dicom or not file.is_file():
                    continue
                data = file.read_bytes()
            except OSError:
                continue
            check(str(file), data)
    assert not found, "\n".join(f"{where}: {what!r}" for where, what in found)
