"""Example inputs that ship inside installed packages (pydicom's test files, scikit-image's data).

They give the app something to classify and a first library on a machine that has no data of its own.
Every example is copied (DICOM) or written as PNG (scikit-image arrays) into one cache folder, so the
app can serve exactly that folder and nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Example:
    key: str  # short stable name, used by the app's buttons and API
    modality: str  # what the file shows (a registered modality name)
    title: str  # what a clinician sees on the button
    filename: str  # the file name in the cache folder
    package: str  # "pydicom" or "skimage"
    source: str  # pydicom test file name or skimage.data function name
    notes: str


EXAMPLES: tuple[Example, ...] = (
    Example("ct", "ct", "CT slice (DICOM)", "CT_small.dcm", "pydicom", "CT_small.dcm",
            "pydicom test file CT_small.dcm: a 128x128 CT slice"),
    Example("mri", "mri", "MRI slice (DICOM)", "MR_small.dcm", "pydicom", "MR_small.dcm",
            "pydicom test file MR_small.dcm: a 64x64 MR slice"),
    Example("ultrasound", "ultrasound", "Ultrasound (DICOM, JPEG 2000)", "examples_jpeg2k.dcm", "pydicom",
            "examples_jpeg2k.dcm",
            "pydicom test file examples_jpeg2k.dcm: an ultrasound frame"),
    Example("ecg", "ecg", "12-lead ECG (DICOM waveform)", "waveform_ecg.dcm", "pydicom", "waveform_ecg.dcm",
            "pydicom test file waveform_ecg.dcm: a 10 s 12-lead ECG"),
    Example("retina", "retina", "Retina fundus photo (PNG)", "retina.png", "skimage", "retina",
            "scikit-image data.retina(): a fundus photograph"),
    Example("pathology", "pathology", "IHC pathology tile (PNG)", "immunohistochemistry.png", "skimage",
            "immunohistochemistry",
            "scikit-image data.immunohistochemistry(): IHC-stained colon tissue"),
)


def get_example(key: str) -> Example:
    for example in EXAMPLES:
        if example.key == key:
            return example
    raise KeyError(f"unknown example {key!r}; known: {', '.join(e.key for e in EXAMPLES)}")


def example_files(cache_dir: str | os.PathLike) -> dict[str, Path]:
    """Key -> path of every example in ``cache_dir``, materialised on first use (atomically)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for example in EXAMPLES:
        target = cache / example.filename
        if not target.is_file():
            _write_atomically(target, example)
        paths[example.key] = target
    return paths


def _write_atomically(target: Path, example: Example) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if example.package == "pydicom":
            from pydicom.data import get_testdata_file

            shutil.copyfile(get_testdata_file(example.source), tmp)
        else:
            import skimage.data
            from PIL import Image

            array = np.asarray(getattr(skimage.data, example.source)(), dtype=np.uint8)
            Image.fromarray(array).save(tmp, format="PNG", compress_level=1)  # fast: written at first start
        os.replace(tmp, target)  # concurrent writers each rename a complete file
    finally:
        tmp.unlink(missing_ok=True)
