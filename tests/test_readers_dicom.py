"""DICOM reader: real pydicom test files, VOI/rescale/MONOCHROME1/multi-frame rules, ECG routing, privacy."""

from __future__ import annotations

import logging
import re
import warnings
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

import m3bind
from pydicom_testdata import pydicom_file_bytes, pydicom_file_path
from m3bind.readers import DEFAULT_LIMITS, Limits
from m3bind.readers.dicom import read_dicom

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
               "ReferringPhysicianName", "InstitutionAddress", "StudyDate", "SeriesDate", "OperatorsName",
               "PerformingPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "DeviceSerialNumber")

# file -> (modality, shape of one frame, modality source)
IMAGES = {
    "CT_small.dcm": ("ct", (128, 128, 3), "dicom"),
    "MR_small.dcm": ("mri", (64, 64, 3), "dicom"),
    "examples_overlay.dcm": ("mri", (300, 484, 3), "dicom"),
    "examples_rgb_color.dcm": ("ultrasound", (240, 320, 3), "dicom"),
    "examples_palette.dcm": ("ultrasound", (350, 800, 3), "dicom"),
    "examples_ybr_color.dcm": ("ultrasound", (240, 320, 3), "dicom"),
    "examples_jpeg2k.dcm": ("ultrasound", (480, 640, 3), "dicom"),
    "J2K_pixelrep_mismatch.dcm": ("ct", (512, 512, 3), "dicom"),
}






def _dataset(name: str) -> Dataset:
    return pydicom.dcmread(pydicom_file_path(name), force=True)  # some test files lack the preamble


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _identifiers(ds: Dataset) -> list[str]:
    values = []
    for keyword in IDENTIFYING:
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 3:
            values.append(value)
    return values


def _assert_no_identifiers(ds: Dataset, *texts: str) -> None:
    for value in _identifiers(ds):
        # digits-only values must not match inside a longer number (e.g. a float in an array repr)
        pattern = re.compile(r"(?<![0-9.])" + re.escape(value) + r"(?![0-9])")
        for text in texts:
            assert not pattern.search(text), f"identifier {value!r} leaked"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_real_dicom_images_load_canonically(name: str) -> None:
    modality, shape, source = IMAGES[name]
    sample = m3bind.load_input(pydicom_file_path(name))
    assert sample.modality == modality
    assert sample.meta["modality_source"] == source
    assert sample.data.shape == shape and sample.data.dtype == np.float32
    assert 0.0 <= sample.data.min() and sample.data.max() <= 1.0
    assert sample.data.max() - sample.data.min() > 0.5  # a real image, not a flat frame
    assert sample.preview.dtype == np.uint8 and sample.preview.shape[2] == 3
    assert max(sample.preview.shape[:2]) <= 512
    assert sample.meta["format"] == "dicom"
    assert sample.meta["rows"] == shape[0] and sample.meta["columns"] == shape[1]
    _assert_no_identifiers(_dataset(name), str(sample.meta), repr(sample.meta), repr(sample))


@pytest.mark.parametrize("name", sorted(IMAGES) + ["liver_1frame.dcm", "waveform_ecg.dcm", "rtstruct.dcm"])
def test_no_identifier_reaches_logs_warnings_or_messages(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = repr(m3bind.load_input(pydicom_file_path(name)))
        except m3bind.InputError as exc:
            outcome = str(exc)
    texts = [outcome, caplog.text] + [str(w.message) for w in caught]
    _assert_no_identifiers(_dataset(name), *texts)


def test_identifiers_checked_are_really_present_in_the_sources() -> None:
    # guards the privacy test above against passing vacuously
    assert "CompressedSamples^CT1" in _identifiers(_dataset("CT_small.dcm"))
    overlay = _identifiers(_dataset("examples_overlay.dcm"))
    assert "AKH - WIEN" in overlay and "021234567" in overlay
    assert "E. O. Ospedali Galliera" in _identifiers(_dataset("waveform_ecg.dcm"))


def test_ct_meta_is_technical_and_whitelisted() -> None:
    sample = m3bind.load_input(pydicom_file_path("CT_small.dcm"))
    meta = sample.meta
    assert meta["modality_code"] == "CT"
    assert meta["photometric_interpretation"] == "MONOCHROME2"
    assert meta["bits_stored"] == 16
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert meta["pixel_spacing"] == pytest.approx([0.661468, 0.661468])
    assert meta["frames"] == 1 and meta["frame_used"] == 0
    raw = _dataset("CT_small.dcm").pixel_array.astype(float) - 1024.0
    assert meta["hu_range"] == [raw.min(), raw.max()]
    assert meta["window_source"] == "default"
    centre, width = meta["window"]
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert centre == pytest.approx((lo + hi) / 2, abs=1e-3) and width == pytest.approx(hi - lo, abs=1e-3)
    allowed = {"modality_code", "body_part_examined", "photometric_interpretation", "voi_lut_function", "rows",
               "columns", "bits_allocated", "bits_stored", "samples_per_pixel", "pixel_spacing",
               "slice_thickness", "rescale_slope", "rescale_intercept", "transfer_syntax", "sop_class",
               "frames", "frame_used", "value_range", "hu_range", "window", "window_source",
               "modality_source", "format"}
    assert set(meta) <= allowed


def test_body_part_examined_is_kept() -> None:
    assert m3bind.load_input(pydicom_file_path("J2K_pixelrep_mismatch.dcm")).meta["body_part_examined"] == "HEAD"


@pytest.mark.parametrize("value, kept", [("CHEST", "CHEST"), ("brain", "BRAIN"), ("DOE JOHN", None),
                                         ("MRN 12345678", None), ("ACC 2024 0042", None), ("HEADX", None)])
def test_body_part_examined_only_passes_defined_terms(tmp_path, value, kept) -> None:
    """Any 16-character header text used to pass through (issue 18, point 3): now only DICOM's defined terms."""
    ds = _dataset("CT_small.dcm")
    ds.BodyPartExamined = value
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    assert m3bind.load_input(path).meta.get("body_part_examined") == kept


def test_header_window_is_applied_with_the_linear_function() -> None:
    sample = m3bind.load_input(pydicom_file_path("MR_small.dcm"))
    assert sample.meta["window_source"] == "dicom" and sample.meta["window"] == [600.0, 1600.0]
    raw = _dataset("MR_small.dcm").pixel_array.astype(np.float64)
    expected = np.clip((raw - 599.5) / 1599.0 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(sample.data[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(sample.data[..., 0], sample.data[..., 2])


def test_window_argument_overrides_the_header() -> None:
    sample = m3bind.load_input(pydicom_file_path("MR_small.dcm"), window=(1000.0, 500.0))
    assert sample.meta["window_source"] == "user" and sample.meta["window"] == [1000.0, 500.0]
    raw = _dataset("MR_small.dcm").pixel_array.astype(np.float64)
    np.testing.assert_allclose(sample.data[..., 0], np.clip((raw - 1000.0) / 500.0 + 0.5, 0, 1), atol=1e-6)


@pytest.mark.parametrize("window", [(40.0, 0.0), (40.0, -5.0), (float("nan"), 100.0), ("a", "b")])
def test_invalid_window_is_refused(window) -> None:
    with pytest.raises(m3bind.InputError, match="window"):
        m3bind.load_input(pydicom_file_path("CT_small.dcm"), window=window)


def test_monochrome1_is_inverted() -> None:
    ds = _dataset("CT_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = read_dicom(_encode(ds), DEFAULT_LIMITS)
    normal = read_dicom(pydicom_file_bytes("CT_small.dcm"), DEFAULT_LIMITS)
    assert inverted.meta["photometric_interpretation"] == "MONOCHROME1"
    assert inverted.meta["window"] == normal.meta["window"]
    np.testing.assert_allclose(inverted.data, 1.0 - normal.data, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied() -> None:
    ds = _dataset("CT_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    sample = read_dicom(_encode(ds), DEFAULT_LIMITS, window=(0.0, 2000.0))
    values = ds.pixel_array.astype(np.float64) * 2 - 1000
    assert sample.meta["hu_range"] == [values.min(), values.max()]
    assert sample.meta["rescale_slope"] == 2.0 and sample.meta["rescale_intercept"] == -1000.0
    np.testing.assert_allclose(sample.data[..., 0], np.clip(values / 2000.0 + 0.5, 0, 1), atol=1e-6)


def _multiframe_ct(n_frames: int) -> Dataset:
    """CT_small turned into n constant frames of k*100 HU, so each frame is recognisable."""
    ds = _dataset("CT_small.dcm")
    shape = ds.pixel_array.shape
    frames = np.stack([np.full(shape, k * 100 + 1024, dtype=np.int16) for k in range(n_frames)])
    ds.set_pixel_data(frames if n_frames > 1 else frames[0], "MONOCHROME2", 16)
    return ds


@pytest.mark.parametrize("n_frames", [1, 4, 5, 9])
def test_multiframe_uses_the_middle_frame(n_frames: int) -> None:
    sample = read_dicom(_encode(_multiframe_ct(n_frames)), DEFAULT_LIMITS, window=(0.0, 4000.0))
    middle = n_frames // 2
    assert sample.meta["frames"] == n_frames and sample.meta["frame_used"] == middle
    np.testing.assert_allclose(sample.data, middle * 100 / 4000.0 + 0.5, atol=1e-6)


def test_real_multiframe_ybr_jpeg_matches_pydicom_middle_frame() -> None:
    ds = _dataset("examples_ybr_color.dcm")
    sample = m3bind.load_input(pydicom_file_path("examples_ybr_color.dcm"))
    assert sample.meta["frames"] == 30 and sample.meta["frame_used"] == 15
    np.testing.assert_allclose(sample.data, ds.pixel_array[15] / 255.0, atol=1e-6)


def test_too_many_frames_is_refused_before_decoding() -> None:
    with pytest.raises(m3bind.InputTooLargeError, match="frames"):
        read_dicom(pydicom_file_bytes("examples_ybr_color.dcm"), Limits(max_frames=10))


@pytest.mark.parametrize("name, frame_bytes", [("CT_small.dcm", 128 * 128 * 2), ("SC_rgb_rle.dcm", 100 * 100 * 3),
                                               ("examples_ybr_color.dcm", 240 * 320 * 3)])
def test_decoded_size_limit_is_per_frame_and_checked_before_decoding(name: str, frame_bytes: int) -> None:
    data = pydicom_file_bytes(name)
    assert read_dicom(data, Limits(max_decoded_bytes=frame_bytes)).data.ndim == 3
    with pytest.raises(m3bind.InputTooLargeError, match="once decoded"):
        read_dicom(data, Limits(max_decoded_bytes=frame_bytes - 1))


def test_enhanced_multiframe_functional_groups() -> None:
    ds = _multiframe_ct(3)
    del ds.RescaleSlope, ds.RescaleIntercept
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(3):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = k * 100, 1000 + k
        item = Dataset()
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    sample = read_dicom(_encode(ds), DEFAULT_LIMITS)
    assert sample.meta["window"] == [100.0, 1001.0] and sample.meta["window_source"] == "dicom"
    assert sample.meta["hu_range"] == [100.0, 100.0]


def test_voi_lut_sequence_is_applied() -> None:
    ds = _dataset("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    lut = np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = Sequence([item])
    sample = read_dicom(_encode(ds), DEFAULT_LIMITS)
    assert sample.meta["window_source"] == "voi_lut"
    np.testing.assert_allclose(sample.data[..., 0], lut[ds.pixel_array] / 65535.0, atol=1e-6)


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                     "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
                                     "MR_small_implicit.dcm"])
def test_lossless_encodings_decode_to_the_same_image(variant: str) -> None:
    reference = m3bind.load_input(pydicom_file_path("MR_small.dcm"))
    sample = m3bind.load_input(pydicom_file_path(variant))
    assert sample.modality == "mri"
    np.testing.assert_array_equal(sample.data, reference.data)


def test_pylibjpeg_plugins_are_installed_and_used() -> None:
    # JPEG-LS and JPEG lossless have no other decoder than pylibjpeg(-libjpeg) in this stack
    assert get_decoder(JPEGLSLossless).available_plugins == ("pylibjpeg",)
    assert get_decoder(JPEGLosslessSV1).available_plugins == ("pylibjpeg",)
    assert "pylibjpeg" in get_decoder(JPEG2000Lossless).available_plugins  # pylibjpeg-openjpeg
    sample = m3bind.load_input(pydicom_file_path("SC_rgb_jpeg_gdcm.dcm"))  # JPEG lossless, process 14 SV1
    assert sample.meta["transfer_syntax"].startswith("JPEG Lossless")
    np.testing.assert_allclose(sample.data, _dataset("SC_rgb_jpeg_gdcm.dcm").pixel_array / 255.0, atol=1e-6)


def test_rgb_and_jpeg2000_colour_match_pydicom() -> None:
    for name in ("examples_rgb_color.dcm", "examples_jpeg2k.dcm"):
        sample = m3bind.load_input(pydicom_file_path(name))
        np.testing.assert_allclose(sample.data, _dataset(name).pixel_array / 255.0, atol=1e-6)


@pytest.mark.parametrize("name", [
    "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL(_422) JPEG
    "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_small_odd_big_endian.dcm", "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit_2frame.dcm", "GDCMJ2K_TextGBR.dcm",
])
def test_colour_encodings_become_rgb_scaled_by_bits_stored(name: str) -> None:
    ds = _dataset(name)
    sample = m3bind.load_input(pydicom_file_path(name))
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = ds.pixel_array[frames // 2] if frames > 1 else ds.pixel_array
    np.testing.assert_allclose(sample.data, expected / float(2 ** ds.BitsStored - 1), atol=1e-6)


def test_palette_colour_becomes_rgb() -> None:
    sample = m3bind.load_input(pydicom_file_path("examples_palette.dcm"))
    assert sample.meta["photometric_interpretation"] == "PALETTE COLOR"
    chroma = sample.data.max(axis=2) - sample.data.min(axis=2)
    assert chroma.max() > 0.3  # the palette produced real colour
    assert sample.preview.shape == (224, 512, 3)


def test_unknown_modality_code_falls_back_to_a_pixel_guess() -> None:
    nm = m3bind.load_input(pydicom_file_path("JPGExtended.dcm"))  # NM, 12-bit JPEG extended
    assert nm.meta["modality_code"] == "NM"
    assert nm.meta["modality_source"] == "guess" and nm.modality == "xray"
    colour = m3bind.load_input(pydicom_file_path("SC_rgb_rle.dcm"))  # OT secondary capture in colour
    assert colour.meta["modality_source"] == "guess" and colour.modality in ("retina", "pathology")


def test_caller_can_override_the_modality() -> None:
    sample = m3bind.load_input(pydicom_file_path("CT_small.dcm"), modality="xray")
    assert sample.modality == "xray" and sample.meta["detected_modality"] == "ct"


def test_dicom_without_preamble_is_read_and_verified() -> None:
    data = pydicom_file_bytes("CT_small.dcm")[132:]  # drop preamble and 'DICM': starts with the file meta group
    sample = m3bind.load_input(data, name="scan.dcm")
    np.testing.assert_array_equal(sample.data, m3bind.load_input(pydicom_file_path("CT_small.dcm")).data)


def test_dicom_named_png_is_still_dicom(tmp_path) -> None:
    path = tmp_path / "looks_like.png"
    path.write_bytes(pydicom_file_bytes("MR_small.dcm"))
    assert m3bind.load_input(path).modality == "mri"


@pytest.mark.parametrize("name, what", [
    ("liver_1frame.dcm", "segmentation object (SEG)"),
    ("rtstruct.dcm", "structure set (RTSTRUCT)"),
    ("rtplan.dcm", "radiotherapy plan (RTPLAN)"),
    ("rtdose.dcm", "dose grid (RTDOSE)"),
    ("test-SR.dcm", "structured report (SR)"),
])
def test_non_image_objects_are_refused_by_name(name: str, what: str) -> None:
    with pytest.raises(m3bind.UnsupportedFormatError) as info:
        m3bind.load_input(pydicom_file_path(name))
    message = str(info.value)
    assert what in message and "not an image" in message
    _assert_no_identifiers(_dataset(name), message)


def test_ecg_waveform_becomes_an_ecg_sample() -> None:
    sample = m3bind.load_input(pydicom_file_path("waveform_ecg.dcm"))
    assert sample.modality == "ecg" and sample.kind == "ecg"
    assert sample.data.shape == (12, 1000) and sample.data.dtype == np.float32
    assert all(sample.meta["lead_mask"])
    assert sample.meta["sop_class"] == "12-lead ECG Waveform Storage"
    assert sample.meta["waveform_label"] == "RHYTHM" and sample.meta["fs_original"] == 1000.0
    # microvolts (sensitivity 1.25 uV) became millivolts: an ECG spans about a millivolt, not a thousand
    assert 0.5 < np.abs(sample.data).max() < 5.0
    _assert_no_identifiers(_dataset("waveform_ecg.dcm"), str(sample.meta), repr(sample.meta), repr(sample))


def test_ecg_channel_units_are_honoured() -> None:
    reference = m3bind.load_input(pydicom_file_path("waveform_ecg.dcm"))
    ds = _dataset("waveform_ecg.dcm")
    for group in ds.WaveformSequence:
        for channel in group.ChannelDefinitionSequence:
            channel.ChannelSensitivity = "0.00125"
            channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mV"
    sample = read_dicom(_encode(ds), DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data, reference.data, atol=1e-5)


def test_waveform_without_voltage_channels_is_refused() -> None:
    ds = _dataset("waveform_ecg.dcm")
    for group in ds.WaveformSequence:
        for channel in group.ChannelDefinitionSequence:
            channel.ChannelSensitivityUnitsSequence[0].CodeValue = "mm[Hg]"
    with pytest.raises(m3bind.UnsupportedFormatError, match="volts"):
        read_dicom(_encode(ds), DEFAULT_LIMITS)


def test_waveform_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(m3bind.InputTooLargeError):
        read_dicom(pydicom_file_bytes("waveform_ecg.dcm"), Limits(max_ecg_samples=5000))


@pytest.mark.parametrize("vr", [b"T\x00", b"XX", b"ZZ"])
def test_a_damaged_value_representation_is_refused_as_corrupt(vr: bytes) -> None:
    """Found by the fuzz suite (tests/test_fuzz_readers.py): CT_small.dcm's Study Time element with an unknown
    VR ('TM' -> 'T\\x00') and length 0 made pydicom raise NotImplementedError while the header was checked for
    truncation, which escaped load_input as a crash instead of a refusal."""
    data = bytearray(pydicom_file_bytes("CT_small.dcm"))
    at = data.index(b"\x08\x00\x30\x00TM")  # (0008,0030) Study Time, explicit VR, 2-byte length
    data[at + 4:at + 8] = vr + b"\x00\x00"
    with pytest.raises(m3bind.CorruptFileError, match="damaged"):
        m3bind.load_input(bytes(data), name="ct.dcm")


# ------------------------------------------------ grey windowing: memory, decode_size, same output as the spec


def _spec_grey(ds: Dataset, window: tuple[float, float] | None = None) -> np.ndarray:
    """The grey image as PS3.3 C.11 states it, computed whole in float64 (what the reader did before it
    windowed in bands): the Modality LUT or rescale, then the window (the header's, the caller's, or the
    0.5-99.5 percentiles without padding), MONOCHROME1 inverted; float32 at the end."""
    from pydicom.pixels import apply_modality_lut

    raw = ds.pixel_array
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if window is not None:
        centre, width = window
    elif "WindowCenter" in ds:
        centre, width = (float(ds[k].value[0] if ds[k].VM > 1 else ds[k].value) for k in ("WindowCenter", "WindowWidth"))
        assert str(ds.get("VOILUTFunction") or "LINEAR") == "LINEAR"
        if width > 1:  # the header's LINEAR function
            centre, width = centre - 0.5, width - 1.0
    else:
        pad = ds.get("PixelPaddingValue")
        lo, hi = np.percentile(values[raw != pad] if isinstance(pad, int) else values, [0.5, 99.5])
        centre, width = float(lo + hi) / 2.0, max(float(hi - lo), 1e-6)
    unit = np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    return (1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit).astype(np.float32)


def _large_ct(side: int, window: bool) -> Dataset:
    """CT_small scaled up to side x side (smooth 12-bit values, HU by its rescale), a header window or not."""
    from PIL import Image

    ds = _dataset("CT_small.dcm")
    small = ds.pixel_array.astype(np.float32)
    big = np.asarray(Image.fromarray(small, "F").resize((side, side), Image.Resampling.BILINEAR))
    ds.set_pixel_data(np.rint(big).astype(np.int16), "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-1024"  # a slope whose products are not integers
    if window:
        ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "J2K_pixelrep_mismatch.dcm",
                                  "JPEG2000.dcm", "image_dfl.dcm"])
@pytest.mark.parametrize("window", [None, (40.0, 400.0)])
def test_grey_windowing_in_bands_is_bit_identical_to_the_whole_image_spec(name, window) -> None:
    sample = m3bind.load_input(pydicom_file_path(name), window=window)
    np.testing.assert_array_equal(sample.data[..., 0], _spec_grey(_dataset(name), window))


@pytest.mark.parametrize("header_window", [False, True])
def test_a_large_grey_dicom_is_windowed_exactly_without_float64_copies(header_window) -> None:
    """Issue 18: windowing ran in float64 over the whole image (912 MiB peak at the 300 MB limit); now the
    float64 values exist a band at a time: at 3000 x 3000 (17 MB of pixels, a 103 MB Sample) the traced peak
    stays under the Sample plus 2 float32 images (it was the Sample plus 3.5 to 6.7 here: 1.4 now), output
    unchanged."""
    import tracemalloc

    ds = _large_ct(3000, header_window)
    data = _encode(ds)
    read_dicom(pydicom_file_bytes("CT_small.dcm"), DEFAULT_LIMITS)  # imports and caches outside the measure
    tracemalloc.start()
    sample = read_dicom(data, DEFAULT_LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    image = 3000 * 3000 * 4
    assert peak < sample.data.nbytes + 2 * image + len(data), peak / 2**20
    np.testing.assert_array_equal(sample.data[..., 0], _spec_grey(ds))
    assert sample.meta["window_source"] == ("dicom" if header_window else "default")


def test_decode_size_shrinks_a_grey_dicom_once_windowed() -> None:
    """With ``decode_size`` (as batch embedding and the app read) a large grey DICOM comes out at that size,
    equal to the whole windowed image resampled as the towers resample, and its full-size float copies
    are never made: the traced peak stays under 3.5 float32 images (a whole read's Sample alone is 3; the
    reader without the early shrink peaked at 6.5)."""
    import tracemalloc

    from PIL import Image

    ds = _large_ct(3000, True)
    data = _encode(ds)
    read_dicom(pydicom_file_bytes("CT_small.dcm"), DEFAULT_LIMITS, decode_size=64)
    tracemalloc.start()
    sample = m3bind.load_input(data, decode_size=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sample.data.shape == (256, 256, 3) and sample.preview.shape == (256, 256, 3)
    assert sample.meta["rows"] == sample.meta["columns"] == 3000 and sample.modality == "ct"
    expected = Image.fromarray(_spec_grey(ds), "F").resize((256, 256), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(sample.data[..., 0], np.asarray(expected), atol=1e-6)
    assert peak < 3.5 * 3000 * 3000 * 4, peak / 2**20
    small = m3bind.load_input(pydicom_file_path("CT_small.dcm"), decode_size=256)  # not larger: unchanged
    np.testing.assert_array_equal(small.data, m3bind.load_input(pydicom_file_path("CT_small.dcm")).data)
