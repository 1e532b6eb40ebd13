"""Hostile and broken image/DICOM inputs: each one a clear ``InputError``, fast, and without big allocations."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
import m3bind
from pydicom_testdata import pydicom_file_bytes, pydicom_file_path
from m3bind.readers import dicom, ecg, image  # noqa: F401  (imported here, not inside the timed calls)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"






def _edited(name: str, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    """A real DICOM file changed in memory and written back to bytes."""
    ds = pydicom.dcmread(pydicom_file_path(name))
    edit(ds)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (64, 48), **options) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buffer = BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _tifffile_bytes(planar_rgb: np.ndarray) -> bytes:
    buffer = BytesIO()
    tifffile.imwrite(buffer, planar_rgb, photometric="rgb", planarconfig="separate")
    return buffer.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose chunks all carry valid CRCs, so only what we forged is wrong."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png16_zeros(side: int) -> bytes:
    """A real 16-bit grey PNG of zeros (what PIL writes for an I;16 image), compressed row by row, so that
    a 10950 x 10950 one (240 MB decoded) is built in a moment and fits in about 250 KB."""
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = bytes(1 + 2 * side)  # filter type 0, then the samples
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def rle_dicom_zeros(side: int) -> bytes:
    """A real RLE Lossless DICOM (CT_small's header) of side x side 16-bit zeros: two byte-plane segments,
    each row its own runs of 128, so 10950 x 10950 (240 MB decoded) is under 4 MB on disk."""
    full, rest = divmod(side, 128)
    row = b"\x81\x00" * full + (bytes([(1 - rest) & 0xFF, 0]) if rest else b"")
    segment = row * side
    frame = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13)) + segment + segment
    ds = pydicom.dcmread(pydicom_file_path("CT_small.dcm"))
    ds.Rows = ds.Columns = side
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _gif_bomb() -> bytes:
    side = 65535
    screen = struct.pack("<HHBBB", side, side, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, side, side, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x4c\x01\x00;"


def _tiff_bomb() -> bytes:
    side = 100_000
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, side), (279, 4, 16)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, data_offset if tag == 273 else value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16)


def _float_rgb_tiff_bomb(tmp: Path) -> bytes:
    """A float64 planar RGB TIFF (read by tifffile, not Pillow) whose tags claim 100000 x 100000 pixels."""
    path = tmp / "bomb.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8)), photometric="rgb", planarconfig="separate")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages.first.tags["ImageWidth"].overwrite(100_000)
        tif.pages.first.tags["ImageLength"].overwrite(100_000)
    return path.read_bytes()


def _float_tiff_with_nan() -> bytes:
    values = np.ones((16, 16), np.float32)
    values[4, 4] = np.nan
    buffer = BytesIO()
    Image.fromarray(values, "F").save(buffer, "TIFF")
    return buffer.getvalue()


def _set(**attributes) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return edit


def _drop_pixel_data(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _short_pixel_data(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[:1000]


def _declared_rle() -> bytes:
    """CT_small whose file meta claims RLE compression while its pixel data stays native (same UID length)."""
    data = pydicom_file_bytes("CT_small.dcm")
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00")


def _short_waveform(ds: pydicom.Dataset) -> None:
    for group in ds.WaveformSequence:
        group.WaveformData = group.WaveformData[:2000]


# id -> (builder(tmp_path) -> (source, load_input kwargs), expected error class)
CASES: dict[str, tuple[Callable[[Path], tuple[object, dict]], type[m3bind.InputError]]] = {
    "empty-bytes": (lambda p: (b"", {}), m3bind.CorruptFileError),
    "random-bytes": (lambda p: (np.random.default_rng(1).bytes(4096), {}), m3bind.UnsupportedFormatError),
    "text-named-png": (lambda p: (b"patient list\nnot an image\n", {"name": "scan.png"}),
                       m3bind.UnsupportedFormatError),
    "text-named-dcm": (lambda p: (b"this is a plain text note, not a DICOM file\n" * 20, {"name": "scan.dcm"}),
                       m3bind.UnsupportedFormatError),
    "png-signature-only": (lambda p: (PNG_SIGNATURE, {}), m3bind.CorruptFileError),
    "png-truncated": (lambda p: (_half(_image("PNG")), {}), m3bind.CorruptFileError),
    "png-forged-100000x100000": (lambda p: (_png(100_000, 100_000, zlib.compress(bytes(101))), {}),
                                 m3bind.InputTooLargeError),
    "png-zero-width": (lambda p: (_png(0, 10, zlib.compress(bytes(10))), {}), m3bind.CorruptFileError),
    "png-corrupt-zlib": (lambda p: (_png(16, 16, b"\x78\x9c" + bytes(range(7, 250, 3))), {}),
                         m3bind.CorruptFileError),
    "jpeg-truncated": (lambda p: (_half(_image("JPEG")), {}), m3bind.CorruptFileError),
    "tiff-truncated": (lambda p: (_half(_image("TIFF")), {}), m3bind.CorruptFileError),
    "tiff-forged-100000x100000": (lambda p: (_tiff_bomb(), {}), m3bind.InputTooLargeError),
    "tiff-float-nan": (lambda p: (_float_tiff_with_nan(), {}), m3bind.CorruptFileError),
    "tiff-float-rgb-forged-100000x100000": (lambda p: (_float_rgb_tiff_bomb(p), {}), m3bind.InputTooLargeError),
    "tiff-float-rgb-truncated": (lambda p: (_half(_tifffile_bytes(np.ones((3, 64, 64)))), {}),
                                 m3bind.CorruptFileError),
    "png-16bit-10950x10950-zeros": (lambda p: (png16_zeros(10_950), {}), m3bind.InputTooLargeError),
    "dicom-rle-10950x10950-16bit-zeros": (lambda p: (rle_dicom_zeros(10_950), {}), m3bind.InputTooLargeError),
    "gif-forged-65535x65535": (lambda p: (_gif_bomb(), {}), m3bind.InputTooLargeError),
    "gif-truncated": (lambda p: (_image("GIF", size=(200, 150))[:300], {}), m3bind.CorruptFileError),
    "bmp-truncated": (lambda p: (_half(_image("BMP")), {}), m3bind.CorruptFileError),
    "webp-truncated": (lambda p: (_half(_image("WEBP")), {}), m3bind.CorruptFileError),
    "dicom-truncated": (lambda p: (_half(pydicom_file_bytes("CT_small.dcm")), {}), m3bind.CorruptFileError),
    "dicom-truncated-jpeg2000": (lambda p: (pydicom_file_bytes("examples_jpeg2k.dcm")[:-5000], {}),
                                 m3bind.CorruptFileError),
    "dicom-preamble-then-garbage": (lambda p: (bytes(128) + b"DICM" + b"\xff" * 300, {}), m3bind.CorruptFileError),
    "dicom-missing-pixel-data": (lambda p: (_edited("CT_small.dcm", _drop_pixel_data), {}),
                                 m3bind.CorruptFileError),
    "dicom-absurd-rows-columns": (lambda p: (_edited("CT_small.dcm", _set(Rows=65535, Columns=65535)), {}),
                                  m3bind.InputTooLargeError),
    "dicom-absurd-frame-count": (lambda p: (_edited("CT_small.dcm", _set(NumberOfFrames=10_000_000)), {}),
                                 m3bind.InputTooLargeError),
    "dicom-zero-rows": (lambda p: (_edited("CT_small.dcm", _set(Rows=0)), {}), m3bind.CorruptFileError),
    "dicom-short-pixel-data": (lambda p: (_edited("CT_small.dcm", _short_pixel_data), {}),
                               m3bind.CorruptFileError),
    "dicom-bits-allocated-12": (lambda p: (_edited("CT_small.dcm", _set(BitsAllocated=12)), {}),
                                m3bind.CorruptFileError),
    "dicom-samples-per-pixel-2": (lambda p: (_edited("CT_small.dcm", _set(SamplesPerPixel=2)), {}),
                                  m3bind.CorruptFileError),
    "dicom-unknown-photometric": (lambda p: (_edited("CT_small.dcm", _set(PhotometricInterpretation="HSV")), {}),
                                  m3bind.UnsupportedFormatError),
    "dicom-native-data-declared-rle": (lambda p: (_declared_rle(), {}), m3bind.CorruptFileError),
    "dicom-broken-jpeg-stream": (lambda p: (pydicom_file_bytes("JPEG-lossy.dcm"), {}), m3bind.CorruptFileError),
    "dicom-waveform-data-short": (lambda p: (_edited("waveform_ecg.dcm", _short_waveform), {}),
                                  m3bind.CorruptFileError),
    "nonexistent-path": (lambda p: (p / "missing.png", {}), m3bind.MissingFileError),
    "directory-path": (lambda p: (p, {}), m3bind.MissingFileError),
    "empty-file-list": (lambda p: ([], {}), m3bind.MissingFileError),
    "input-of-another-type": (lambda p: (12345, {}), m3bind.UnsupportedFormatError),
    "dicom-window-not-numbers": (lambda p: (pydicom_file_bytes("CT_small.dcm"), {"window": ("wide", "bone")}),
                                 m3bind.OptionError),
    "dicom-window-negative-width": (lambda p: (pydicom_file_bytes("CT_small.dcm"), {"window": (40, -400)}),
                                    m3bind.OptionError),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_raises_a_clear_input_error(case: str, tmp_path: Path) -> None:
    build, expected = CASES[case]
    source, kwargs = build(tmp_path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(m3bind.InputError) as info:
            m3bind.load_input(source, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, expected), f"{type(info.value).__name__}: {info.value}"
    assert type(info.value) is not m3bind.InputError, "a refusal names its kind: one of the InputError subclasses"
    message = str(info.value)
    assert len(message) >= 15 and " " in message
    assert "Traceback" not in message and "<_io" not in message and "0x" not in message
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert peak < 64 * 2**20, f"allocated {peak / 2**20:.0f} MB while refusing the input"


def test_small_on_disk_huge_decoded_files_are_real_and_refused_by_decoded_size(tmp_path: Path) -> None:
    """The builders make files that decode (small ones are read normally); the large ones are under the pixel
    limit, so only the decoded-size limit (bytes, checked from the header) stops them."""
    png = png16_zeros(300)
    with Image.open(BytesIO(png)) as img:
        assert img.mode == "I;16" and img.size == (300, 300) and not np.asarray(img).any()
    dcm = rle_dicom_zeros(300)
    assert not pydicom.dcmread(BytesIO(dcm)).pixel_array.any()
    for data in (png, dcm):
        sample = m3bind.load_input(data)
        assert sample.data.shape == (300, 300, 3) and np.ptp(sample.data) == 0  # one uniform grey
    big_png, big_dcm = png16_zeros(10_950), rle_dicom_zeros(10_950)
    assert len(big_png) < 300_000 and len(big_dcm) < 4_000_000
    assert 10_950 ** 2 < m3bind.Limits().max_pixels
    for data in (big_png, big_dcm):
        with pytest.raises(m3bind.InputTooLargeError, match="once decoded"):
            m3bind.load_input(data)


def test_at_least_twenty_distinct_cases() -> None:
    assert len(CASES) >= 20


def test_png_named_dcm_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "photo.dcm"
    path.write_bytes(_image("PNG"))
    sample = m3bind.load_input(path)
    assert sample.meta["format"] == "png" and sample.data.shape == (48, 64, 3)

