"""Every file of pydicom's own test data, read by ``m3bind.load_input`` (issue 18, fuzzing).

The corpus is the union of ``pydicom.data.get_testdata_files()`` and every file in the installed
``pydicom/data`` folder (test_files, charset_files, palettes, DICOMDIRs, dumps, JSON, ICC profiles, the
package's own modules). Each file must end in a valid ``Sample`` or in a named ``InputError`` subclass, never in
the bare ``InputError`` or any other exception. The outcome of each file is not pinned: what is readable is
decided by the reader tests; this test is about never crashing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom.data
import pytest

import m3bind
from m3bind.errors import InputError

DATA_DIR = Path(pydicom.data.__file__).resolve().parent


def corpus() -> list[Path]:
    files = {Path(p).resolve() for p in pydicom.data.get_testdata_files()}
    files |= {p.resolve() for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(files)


FILES = corpus()


def test_the_corpus_is_all_there():
    assert len(FILES) >= 190, f"only {len(FILES)} files found under {DATA_DIR}"
    names = {p.name for p in FILES}
    assert {"CT_small.dcm", "waveform_ecg.dcm", "examples_jpeg2k.dcm", "DICOMDIR"} <= names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(DATA_DIR)) if p.is_relative_to(DATA_DIR) else p.name
                                             for p in FILES])
def test_every_pydicom_data_file_loads_or_is_refused_by_name(path: Path):
    try:
        sample = m3bind.load_input(path)
    except InputError as exc:
        assert type(exc) is not InputError, f"bare InputError (use a subclass): {exc}"
        assert str(exc).strip()
        return
    assert np.isfinite(sample.data).all() and sample.data.dtype == np.float32
    if sample.kind == "ecg":
        assert sample.data.shape == (12, 1000)
    else:
        assert sample.data.ndim == 3 and sample.data.shape[2] == 3
        assert 0.0 <= sample.data.min() and sample.data.max() <= 1.0
