"""The real DICOM files that pydicom ships, read in place (shared by the reader tests)."""

from pydicom.data import get_testdata_file


def pydicom_file_path(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return path


def pydicom_file_bytes(name: str) -> bytes:
    with open(pydicom_file_path(name), "rb") as f:
        return f.read()
