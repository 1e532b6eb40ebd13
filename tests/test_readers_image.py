"""Plain image reader: real X-ray, pathology and fundus images, every PIL mode we accept, the guard rails."""

from __future__ import annotations

import csv
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

import m3bind
from m3bind.readers import DEFAULT_LIMITS, Limits
from m3bind.readers.image import guess_image_modality, image_sample, read_image, to_unit


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _assert_canonical(sample: m3bind.Sample, height: int, width: int) -> None:
    assert sample.data.shape == (height, width, 3) and sample.data.dtype == np.float32
    assert sample.data.flags["C_CONTIGUOUS"]
    assert 0.0 <= sample.data.min() and sample.data.max() <= 1.0
    assert sample.preview.dtype == np.uint8 and sample.preview.ndim == 3 and sample.preview.shape[2] == 3
    assert max(sample.preview.shape[:2]) == min(512, max(height, width))


@pytest.fixture(scope="module")
def retina_png() -> bytes:
    """skimage's real fundus photograph (1411 x 1411), encoded once for the module."""
    return _encode(Image.fromarray(skimage.data.retina()), "PNG")


def _covid_files(shared_data: Path, modality: str) -> list[Path]:
    with open(shared_data / "covid_cxr" / "metadata.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["modality"] == modality]
    return [shared_data / "covid_cxr" / row["filename"] for row in rows]


def test_real_chest_xrays_are_detected_as_xray(shared_data: Path) -> None:
    files = _covid_files(shared_data, "X-ray")
    assert len(files) >= 90
    for path in files[::9]:
        sample = m3bind.load_input(path)
        with Image.open(path) as img:
            width, height = img.size
        _assert_canonical(sample, height, width)
        assert sample.modality == "xray" and sample.meta["modality_source"] == "guess"
        assert sample.meta["format"] == "jpeg"
        assert sample.meta["width"] == width and sample.meta["height"] == height
        np.testing.assert_array_equal(sample.data[..., 0], sample.data[..., 1])  # grey replicated


@pytest.mark.parametrize("label", ["lung_aca", "lung_n", "lung_scc"])
def test_real_pathology_tiles_are_detected_as_pathology(shared_data: Path, label: str) -> None:
    files = sorted((shared_data / "pathology" / "lc25000_lung" / label).glob("*.jpg"))
    assert files
    for path in files[:: max(1, len(files) // 8)]:
        sample = m3bind.load_input(path)
        assert sample.modality == "pathology"
        assert sample.data.shape[2] == 3 and sample.meta["channels"] == 3


def test_fundus_photograph_is_detected_as_retina_and_previewed_small(retina_png: bytes) -> None:
    rgb = skimage.data.retina()
    sample = m3bind.load_input(retina_png)
    assert sample.modality == "retina"
    _assert_canonical(sample, *rgb.shape[:2])
    assert sample.preview.shape == (512, 512, 3)
    np.testing.assert_allclose(sample.data, rgb / 255.0, atol=1e-6)


def test_immunohistochemistry_is_detected_as_pathology() -> None:
    sample = m3bind.load_input(_encode(Image.fromarray(skimage.data.immunohistochemistry()), "JPEG", quality=95))
    assert sample.modality == "pathology" and sample.meta["format"] == "jpeg"


def test_caller_can_override_the_guess(retina_png: bytes) -> None:
    sample = m3bind.load_input(retina_png, modality="dermoscopy")
    assert sample.modality == "dermoscopy" and sample.meta["detected_modality"] == "retina"


def test_guess_image_modality_rules() -> None:
    grey = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    assert guess_image_modality(grey) == "xray"
    assert guess_image_modality(np.repeat(grey[..., None], 3, axis=2)) == "xray"
    yy, xx = np.mgrid[:128, :128]
    disc = ((yy - 64) ** 2 + (xx - 64) ** 2) < 60 ** 2
    fundus = np.zeros((128, 128, 3), np.uint8)
    fundus[disc] = (200, 90, 40)
    assert guess_image_modality(fundus) == "retina"
    pink = np.full((128, 128, 3), (230, 150, 200), np.uint8)
    assert guess_image_modality(pink) == "pathology"


def test_16bit_png_is_scaled_by_its_effective_bit_depth() -> None:
    twelve_bit = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    sample = read_image(_encode(Image.fromarray(twelve_bit), "PNG"), DEFAULT_LIMITS)
    assert sample.meta["bit_depth"] == 16 and sample.meta["mode"].startswith("I")
    np.testing.assert_allclose(sample.data[..., 0], twelve_bit / 4095.0, atol=1e-6)
    full = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    sample = read_image(_encode(Image.fromarray(full), "PNG"), DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data[..., 0], full / 65535.0, atol=1e-6)


def test_rgba_is_composited_on_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (255, 128, 0)
    rgba[:, :4, 3] = 255
    rgba[:, 4:6, 3] = 0
    rgba[:, 6:, 3] = 102
    sample = read_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)
    np.testing.assert_allclose(sample.data[0, 4], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(sample.data[0, 7], [0.4, 0.4 * 128 / 255, 0.0], atol=1e-6)


def test_grey_with_alpha() -> None:
    la = Image.fromarray(np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 51, np.uint8)], axis=2), "LA")
    sample = read_image(_encode(la, "PNG"), DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data, 200 / 255 * 0.2, atol=1e-6)


def test_palette_images_with_and_without_transparency() -> None:
    index = (np.arange(16 * 16).reshape(16, 16) % 3).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    sample = read_image(_encode(img, "PNG"), DEFAULT_LIMITS)
    assert sample.meta["mode"] == "P"
    np.testing.assert_array_equal(sample.data[0, 0], [1, 0, 0])
    np.testing.assert_array_equal(sample.data[0, 1], [0, 1, 0])
    transparent = read_image(_encode(img, "PNG", transparency=1), DEFAULT_LIMITS)
    np.testing.assert_array_equal(transparent.data[0, 1], [0, 0, 0])  # palette entry 1 is transparent
    np.testing.assert_array_equal(transparent.data[0, 2], [0, 0, 1])


def test_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("TIFF", "JPEG"):
        sample = read_image(_encode(cmyk, fmt), DEFAULT_LIMITS)
        assert sample.meta["mode"] == "CMYK" and sample.meta["channels"] == 4
        np.testing.assert_allclose(sample.data[8, 8], [1, 0, 0], atol=0.03)


def test_float_tiff_in_unit_range_is_kept_and_outside_is_rescaled() -> None:
    values = np.linspace(0.1, 0.9, 32 * 32, dtype=np.float32).reshape(32, 32)
    sample = read_image(_encode(Image.fromarray(values, "F"), "TIFF"), DEFAULT_LIMITS)
    assert sample.meta["mode"] == "F"
    np.testing.assert_allclose(sample.data[..., 1], values, atol=1e-6)
    hu = values * 3000 - 1000
    sample = read_image(_encode(Image.fromarray(hu, "F"), "TIFF"), DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data[..., 0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-5)


def test_float_tiff_with_nan_is_refused() -> None:
    values = np.ones((8, 8), np.float32)
    values[3, 3] = np.nan
    with pytest.raises(m3bind.CorruptFileError, match="NaN"):
        read_image(_encode(Image.fromarray(values, "F"), "TIFF"), DEFAULT_LIMITS)


def _tifffile_bytes(array: np.ndarray, **options) -> bytes:
    import tifffile

    buffer = BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("planar", [True, False], ids=["planar", "chunky"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_float_rgb_tiff_is_read(planar: bool, dtype) -> None:
    """README promises float TIFF; Pillow opens no float colour TIFF (nor float64 grey): tifffile reads them."""
    rgb = skimage.data.astronaut()[::8, ::8].astype(dtype) / 255.0  # a real photograph, 64 x 64
    stored = np.ascontiguousarray(np.moveaxis(rgb, -1, 0)) if planar else rgb
    data = _tifffile_bytes(stored, photometric="rgb", planarconfig="separate" if planar else "contig")
    sample = m3bind.load_input(data)
    _assert_canonical(sample, 64, 64)
    assert sample.meta["mode"] == "RGB" and sample.meta["bit_depth"] == np.dtype(dtype).itemsize * 8
    assert sample.meta["decoder"] == "tifffile" and sample.meta["sample_format"] == "float"
    np.testing.assert_allclose(sample.data, rgb, atol=1e-6)
    scaled = read_image(_tifffile_bytes(stored * 4000 - 1000, photometric="rgb",
                                        planarconfig="separate" if planar else "contig"), DEFAULT_LIMITS)
    np.testing.assert_allclose(scaled.data, (rgb - rgb.min()) / (rgb.max() - rgb.min()), atol=1e-5)


def test_float64_grey_tiff_is_read_and_nan_refused() -> None:
    values = np.linspace(0.1, 0.9, 32 * 32).reshape(32, 32)
    sample = read_image(_tifffile_bytes(values), DEFAULT_LIMITS)
    assert sample.meta["mode"] == "L" and sample.meta["bit_depth"] == 64
    np.testing.assert_allclose(sample.data[..., 2], values, atol=1e-6)
    values[3, 3] = np.nan
    with pytest.raises(m3bind.CorruptFileError, match="NaN"):
        read_image(_tifffile_bytes(values), DEFAULT_LIMITS)


def test_16bit_32bit_tiff_and_bilevel_png() -> None:
    values = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    sample = read_image(_encode(Image.fromarray(values), "TIFF"), DEFAULT_LIMITS)
    assert sample.meta["format"] == "tiff" and sample.meta["bit_depth"] == 16
    np.testing.assert_allclose(sample.data[..., 0], values / 65535.0, atol=1e-6)
    signed = (np.arange(32 * 32).reshape(32, 32) * 7 - 3000).astype(np.int32)
    sample = read_image(_encode(Image.fromarray(signed, "I"), "TIFF"), DEFAULT_LIMITS)
    assert sample.meta["mode"] == "I" and sample.meta["bit_depth"] == 32
    np.testing.assert_allclose(sample.data[..., 2], (signed + 3000) / (signed.max() + 3000.0), atol=1e-6)
    bits = Image.fromarray(np.eye(16, dtype=bool))
    sample = read_image(_encode(bits, "PNG"), DEFAULT_LIMITS)
    assert sample.meta["bit_depth"] == 1
    np.testing.assert_array_equal(sample.data[..., 0], np.eye(16))


@pytest.mark.parametrize("fmt, options, exact", [
    ("BMP", {}, True), ("WEBP", {"lossless": True}, True), ("TIFF", {"compression": "tiff_lzw"}, True),
    ("PNG", {}, True), ("JPEG", {"quality": 95}, False),
])
def test_each_format_round_trips(fmt: str, options: dict, exact: bool) -> None:
    rgb = skimage.data.immunohistochemistry()[:200, :300]
    sample = m3bind.load_input(_encode(Image.fromarray(rgb), fmt, **options))
    assert sample.meta["format"] == fmt.lower()
    _assert_canonical(sample, 200, 300)
    if exact:
        np.testing.assert_allclose(sample.data, rgb / 255.0, atol=1e-6)
    else:
        assert np.abs(sample.data - rgb / 255.0).mean() < 0.02


def test_gif_first_frame_only() -> None:
    frames = [Image.fromarray(np.full((10, 12), value, np.uint8)).convert("P") for value in (40, 200, 120)]
    buffer = BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    sample = m3bind.load_input(buffer.getvalue())
    assert sample.meta["format"] == "gif"
    np.testing.assert_allclose(sample.data, 40 / 255.0, atol=1e-6)


def test_exif_orientation_applied_and_exif_not_copied() -> None:
    img = Image.fromarray(skimage.data.immunohistochemistry()[:100, :300])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x013B] = "Jane Doe"  # Artist
    exif[0x010F] = "ClinicCam"  # Make
    sample = m3bind.load_input(_encode(img, "JPEG", exif=exif.tobytes()))
    assert sample.data.shape == (300, 100, 3)
    assert sample.meta["width"] == 100 and sample.meta["height"] == 300
    assert "Jane Doe" not in str(sample.meta) and "ClinicCam" not in str(sample.meta)
    assert set(sample.meta) == {"format", "width", "height", "mode", "bit_depth", "channels", "modality_source"}


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    data = _encode(Image.fromarray(np.zeros((100, 100), np.uint8)), "PNG")
    with pytest.raises(m3bind.InputTooLargeError, match="megapixels"):
        read_image(data, Limits(max_pixels=5_000))
    # the header alone is enough: a file cut right after its header is refused as too large, not as truncated
    with pytest.raises(m3bind.InputTooLargeError):
        read_image(data[: data.index(b"IDAT") + 4], Limits(max_pixels=5_000))


@pytest.mark.parametrize("mode, bytes_per_pixel", [("L", 1), ("RGB", 3), ("RGBA", 4), ("I;16", 2), ("F", 4)])
def test_decoded_size_limit_is_checked_from_the_header_in_bytes(mode: str, bytes_per_pixel: int) -> None:
    """width x height x channels x bytes per sample, against Limits.max_decoded_bytes, before decoding."""
    img = Image.fromarray(np.zeros((48, 64), np.uint8)).convert(mode) if mode != "I;16" \
        else Image.fromarray(np.zeros((48, 64), np.uint16))
    data = _encode(img, "TIFF" if mode == "F" else "PNG")
    exact = 64 * 48 * bytes_per_pixel
    assert read_image(data, Limits(max_decoded_bytes=exact)).data.shape == (48, 64, 3)
    with pytest.raises(m3bind.InputTooLargeError, match="once decoded"):
        read_image(data, Limits(max_decoded_bytes=exact - 1))
    with pytest.raises(m3bind.InputTooLargeError):  # the header alone is enough
        read_image(data[:200], Limits(max_decoded_bytes=exact - 1))


def test_decoded_size_limit_counts_what_is_decoded() -> None:
    """A JPEG read for batch embedding (decode_size) is decoded small (DCT scaling), so only that counts;
    a float64 RGB TIFF counts 8 bytes a sample."""
    photo = _encode(Image.fromarray(skimage.data.astronaut()).resize((2048, 1536)), "JPEG")
    small = Limits(max_decoded_bytes=2_000_000)  # 2048 x 1536 x 3 = 9.4 MB; at 1/4 scale 590 KB
    with pytest.raises(m3bind.InputTooLargeError):
        read_image(photo, small)
    assert max(read_image(photo, small, decode_size=448).data.shape) == 448
    rgb = np.zeros((3, 40, 50))
    data = _tifffile_bytes(rgb, photometric="rgb", planarconfig="separate")
    read_image(data, Limits(max_decoded_bytes=40 * 50 * 3 * 8))
    with pytest.raises(m3bind.InputTooLargeError, match="3 channels of 64 bits"):
        read_image(data, Limits(max_decoded_bytes=40 * 50 * 3 * 8 - 1))


def test_default_decoded_size_limit() -> None:
    """Admits a 4288 x 2848 RGB fundus photograph, a 4096 x 4096 RGB tile and a 3000 x 3000 16-bit DICOM;
    refuses the 10950 x 10950 16-bit image (under the pixel limit) that took 3 GB to read."""
    from m3bind.readers import check_decoded_size

    for width, height, channels, depth in ((4288, 2848, 3, 1), (4096, 4096, 3, 1), (3000, 3000, 1, 2)):
        check_decoded_size(width, height, channels, depth, DEFAULT_LIMITS)
    assert 10_950 ** 2 < DEFAULT_LIMITS.max_pixels
    with pytest.raises(m3bind.InputTooLargeError):
        check_decoded_size(10_950, 10_950, 1, 2, DEFAULT_LIMITS)


def test_pil_global_settings_are_left_alone(retina_png: bytes) -> None:
    before = Image.MAX_IMAGE_PIXELS
    read_image(retina_png, Limits(max_pixels=10**9))
    with pytest.raises(m3bind.CorruptFileError):
        read_image(retina_png[:5000], DEFAULT_LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_sample_canonicalises_shared_array_forms() -> None:
    grey = np.arange(600 * 1000, dtype=np.uint32).reshape(600, 1000) % 256
    sample = image_sample(grey.astype(np.uint8), "xray", {"source": "test"})
    assert sample.data.shape == (600, 1000, 3) and sample.preview.shape == (307, 512, 3)
    assert sample.meta == {"source": "test"} and sample.modality == "xray"
    single = image_sample(np.full((4, 5, 1), 0.25, np.float64), "ct", {})
    np.testing.assert_allclose(single.data, 0.25)
    assert single.data.dtype == np.float32
    with pytest.raises(m3bind.CorruptFileError):
        image_sample(np.zeros((4, 5, 2)), "ct", {})
    with pytest.raises(m3bind.CorruptFileError):
        image_sample(np.zeros((0, 5)), "ct", {})


def test_to_unit_rules() -> None:
    np.testing.assert_allclose(to_unit(np.array([0, 4095], np.uint16)), [0, 1])
    np.testing.assert_allclose(to_unit(np.array([0, 255], np.uint16), bits=12), [0, 255 / 4095])
    np.testing.assert_allclose(to_unit(np.array([-1000, 1000], np.int16)), [0, 1])
    np.testing.assert_allclose(to_unit(np.array([True, False])), [1, 0])
    with pytest.raises(m3bind.CorruptFileError):
        to_unit(np.array([0.0, np.inf]))
