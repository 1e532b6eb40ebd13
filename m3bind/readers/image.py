"""Plain images (PNG, JPEG, TIFF, BMP, WebP, GIF) into the canonical image ``Sample``.

Policies, chosen once here:
  * only the first frame of animated GIFs and multi-page TIFFs is read;
  * transparency (RGBA, LA, palette transparency) is composited on **black**, because medical images
    have dark backgrounds and a white fill would read as tissue or exposure;
  * integer images deeper than 8 bits are scaled by their *effective* bit depth (a 12-bit X-ray in a
    16-bit PNG is divided by 4095, not 65535, so it does not come out nearly black);
  * float images must be finite (NaN/inf raise ``CorruptFileError``); values outside [0, 1] are
    min-max scaled; TIFFs that Pillow cannot open (float RGB, float64, planar colour, BigTIFF) are read
    with tifffile (``meta["decoder"] == "tifffile"``);
  * EXIF orientation is applied, and nothing from EXIF or other metadata chunks reaches ``meta``.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import CorruptFileError, InputError, InputTooLargeError, UnsupportedFormatError
from ..sample import Sample
from . import Limits, check_decoded_size

PREVIEW_SIDE = 512
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")  # PIL's JPEG opener also yields MPO files
_FORMAT_NAMES = {"MPO": "jpeg"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BAND = 1 << 20  # values per band of rows where a full-size temporary is avoided


def to_unit(array: np.ndarray, bits: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Scale integer or float pixel values to float32 in [0, 1].

    Integers are divided by ``2**bits - 1`` (``bits`` defaults to the effective bit depth of the data,
    at least 8); signed data with negative values and floats outside [0, 1] are min-max scaled. The
    result is computed in place in ``out`` (float32, the same shape; a new array if None), without a
    full-size temporary: at the decoded-size limit every extra copy costs hundreds of MB.
    """
    a = np.asarray(array)
    out = np.empty(a.shape, dtype=np.float32) if out is None else out
    if a.dtype == np.uint8 and bits in (None, 8):  # the common case, in one pass: nothing to check
        return np.divide(a, np.float32(255.0), out=out, dtype=np.float32)
    out[...] = a
    if a.dtype == np.bool_:
        return out
    unsigned = np.issubdtype(a.dtype, np.unsignedinteger)
    if np.issubdtype(a.dtype, np.integer) and (unsigned or a.size == 0 or a.min() >= 0):
        if bits is None:
            bits = max(8, int(a.max()).bit_length() if a.size else 8)
        out /= float(2**bits - 1)
        return np.clip(out, 0.0, 1.0, out=out)
    if not np.isfinite(out).all():
        raise CorruptFileError("The image contains invalid pixel values (NaN or infinity).")
    lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        return out
    if hi > lo:
        out -= lo
        out /= hi - lo
    else:
        out[...] = 0.0
    return out


def image_sample(array: np.ndarray, modality: str, meta: dict[str, Any]) -> Sample:
    """Build the canonical image ``Sample`` that every image reader returns.

    ``array`` is (H, W), (H, W, 1) or (H, W, 3), integer or float, scaled to [0, 1] by ``to_unit``;
    grey is replicated to three channels and a preview (long side <= 512) is made. Memory: the Sample
    (12 bytes a pixel) is the only full-size float array made; grey is scaled straight into its first
    channel, and the preview is drawn from grey before it is replicated.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.shape[0] == 0 or a.shape[1] == 0:
        raise CorruptFileError(f"The image has an unusable pixel layout (shape {tuple(np.shape(array))}).")
    data = np.empty((*a.shape[:2], 3), dtype=np.float32)
    if a.ndim == 2:  # grey is scaled before it is replicated: a third of the work
        unit = to_unit(a, out=data[..., 0])
        _replicate_first_channel(data)
    else:
        unit = to_unit(a, out=data)
    pixels = a if a.dtype == np.uint8 else _to_uint8(unit)
    return Sample(modality=modality, data=data, preview=_preview(pixels), meta=dict(meta))


def _replicate_first_channel(data: np.ndarray) -> None:
    """Copies channel 0 into channels 1 and 2 a band of rows at a time: numpy copies an overlapping source
    whole first (a full-size temporary)."""
    rows = max(1, _BAND // data.shape[1])
    for start in range(0, len(data), rows):
        band = data[start:start + rows]
        band[..., 1:] = band[..., :1]


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """``unit * 255`` rounded to uint8, a band of rows at a time (no full-size float temporary)."""
    out = np.empty(unit.shape, dtype=np.uint8)
    rows = max(1, _BAND // max(1, unit[0].size))
    for start in range(0, len(unit), rows):
        out[start:start + rows] = unit[start:start + rows] * np.float32(255.0) + np.float32(0.5)
    return out


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a)


def _preview(pixels: np.ndarray) -> np.ndarray:
    """8-bit RGB, long side at most ``PREVIEW_SIDE`` (grey is shrunk before it is replicated)."""
    if max(pixels.shape[:2]) > PREVIEW_SIDE:
        img = Image.fromarray(np.ascontiguousarray(pixels), "L" if pixels.ndim == 2 else "RGB")
        img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        pixels = np.asarray(img, dtype=np.uint8)
    return _rgb(pixels)


def guess_image_modality(rgb: np.ndarray) -> str:
    """Guess the modality of an image that carries no tags: "xray", "retina" or "pathology".

    Grey-looking images are taken for X-rays; colour images whose corners are mostly black (the dark
    surround of a fundus photograph) for retina; any other colour image for pathology.
    """
    a = np.asarray(rgb)
    if a.ndim == 2 or a.shape[-1] == 1:
        return "xray"
    step = max(1, max(a.shape[:2]) // 128)  # about 128 px a side is plenty for these rules
    a = to_unit(a[::step, ::step, :3])
    chroma = a.max(axis=2) - a.min(axis=2)
    if float(np.percentile(chroma, 95)) < 0.08:
        return "xray"
    h, w = chroma.shape
    ch, cw = max(1, h // 10), max(1, w // 10)
    luma = a.mean(axis=2)
    corners = [luma[:ch, :cw], luma[:ch, -cw:], luma[-ch:, :cw], luma[-ch:, -cw:]]
    dark_corners = sum(float((c < 0.1).mean()) > 0.8 for c in corners)
    centre = luma[h // 4: h - h // 4, w // 4: w - w // 4]
    if dark_corners >= 3 and float(centre.mean()) > 0.15:
        return "retina"
    return "pathology"


def read_image(data: bytes, limits: Limits, decode_size: int | None = None) -> Sample:
    """Decode a plain image file; the pixel count and the decoded size in bytes (``Limits.max_pixels``,
    ``Limits.max_decoded_bytes``) are checked from the header before any decoding.

    ``decode_size`` lets a caller that will shrink the image anyway (batch embedding, the app) skip most
    of the decoding work and memory: an image larger than that comes out with its long side at
    ``decode_size`` (JPEGs decoded with DCT scaling, then resampled as the towers resample), preview
    included; a grey image deeper than 8 bits is scaled by the bit depth of the whole image. Float
    images come out whole. ``meta`` keeps the file's size.
    """
    try:
        opened = _open_checked(data, limits)
    except CorruptFileError:
        if data[:4] in _TIFF_MAGIC:  # a TIFF variant Pillow does not know: float RGB, float64, BigTIFF, ...
            return _read_tiff(data, limits)
        raise
    with opened as img:
        fmt = _FORMAT_NAMES.get(img.format or "", (img.format or "image").lower())
        size = img.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # JPEG only (others ignore it): DCT scaling (8x8 block means at most) to no less than
                # decode_size; drafted[1] = where the file's pixels lie in the scaled image
                drafted = img.draft(None, _fit(size, decode_size)) if decode_size else None
                check_decoded_size(*img.size, len(img.getbands()), _bytes_per_band(img.mode), limits)
                img.load()
                bits = _effective_bits(img)
                if drafted:  # its EXIF, kept in img.info, goes along
                    img = _shrink(img, _fit(size, decode_size), drafted[1])
                if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned by 90 degrees
                    size = size[::-1]
                ImageOps.exif_transpose(img, in_place=True)
                if decode_size and not drafted:  # after turning: TIFF keeps its orientation in the file's tags
                    img = _shrink(img, _fit(size, decode_size), (0, 0, *size))
                array = _pil_to_array(img)
                if decode_size and bits is not None:  # a deep image, perhaps shrunk: the whole one's depth
                    array = to_unit(array, bits)
        except Image.DecompressionBombError as exc:
            raise InputTooLargeError(_too_large(size, limits)) from exc
        except InputError:
            raise
        except Exception as exc:  # any decoder failure: truncated stream, bad zlib/huffman data, bad tiles
            raise CorruptFileError(
                f"The {fmt.upper()} file is damaged or truncated and could not be decoded.") from exc
        meta = {
            "format": fmt,
            "width": size[0],
            "height": size[1],
            "mode": img.mode,
            "bit_depth": _bit_depth(img.mode),
            "channels": len(img.getbands()),
            "modality_source": "guess",
        }
    return image_sample(array, guess_image_modality(array), meta)


def _open_checked(data: bytes, limits: Limits) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before a pixel is decoded.

    PIL's own bomb check (a module-level setting) is left as it is; its error is translated, so the
    effective ceiling is the smaller of ``limits.max_pixels`` and PIL's.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputTooLargeError("The image declares dimensions far beyond the pixel limit for an upload; "
                                 "it was refused before decoding.") from exc
    except Exception as exc:
        raise CorruptFileError(
            "The image file is damaged or uses an encoding that cannot be read (its header is invalid).") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise CorruptFileError(f"The image header declares an empty image ({w} x {h} pixels).")
    if w * h > limits.max_pixels:
        raise InputTooLargeError(_too_large(img.size, limits))
    return img


def _read_tiff(data: bytes, limits: Limits) -> Sample:
    """The first page of a TIFF that Pillow cannot open, with tifffile (installed with scikit-image).

    Grey (MINISBLACK/MINISWHITE) or RGB, chunky or planar, of any integer or float sample type; an
    alpha channel is composited on black. Sizes are checked from the page's tags before decoding.
    """
    try:
        import tifffile
    except ImportError:
        raise UnsupportedFormatError("This TIFF variant (e.g. floating-point colour) needs the tifffile "
                                     "package, which is not installed.") from None
    try:
        with tifffile.TiffFile(BytesIO(data)) as tif:
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            samples, photometric = int(page.samplesperpixel), int(page.photometric)
            dtype = page.dtype
            if width <= 0 or height <= 0:
                raise CorruptFileError(f"The image header declares an empty image ({width} x {height} pixels).")
            if width * height > limits.max_pixels:
                raise InputTooLargeError(_too_large((width, height), limits))
            if dtype is not None:
                check_decoded_size(width, height, samples, dtype.itemsize, limits)
            axes = page.axes
            if dtype is None or dtype.kind not in "biuf" or axes not in ("YX", "YXS", "SYX") \
                    or photometric not in (0, 1, 2) or samples not in ((1, 2) if photometric < 2 else (3, 4)):
                raise UnsupportedFormatError(
                    f"This TIFF's pixel layout ({samples} samples of {dtype}, axes {axes}) is not supported.")
            array = page.asarray()
    except InputError:
        raise
    except Exception as exc:  # bad tags, truncated strips, a compression tifffile cannot decode
        raise CorruptFileError("The TIFF file is damaged or uses an encoding that cannot be read.") from exc
    if axes == "SYX":
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and samples in (2, 4):  # colour or grey, then alpha
        colour = to_unit(array[..., :-1])
        array = colour * to_unit(array[..., -1:])
    if photometric == 0:  # MINISWHITE: 0 is white
        array = 1.0 - to_unit(array)
    meta = {
        "format": "tiff",
        "width": width,
        "height": height,
        "mode": ("L", "LA", "RGB", "RGBA")[samples - 1],
        "bit_depth": dtype.itemsize * 8,
        "sample_format": {"b": "uint", "u": "uint", "i": "int", "f": "float"}[dtype.kind],
        "channels": samples,
        "decoder": "tifffile",
        "modality_source": "guess",
    }
    return image_sample(array, guess_image_modality(array), meta)


def _fit(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """``size`` scaled down so that its long side is ``long_side``, rounded as the towers round it."""
    scale = long_side / max(size)
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale < 1 else size


def _shrink(img: Image.Image, target: tuple[int, int], box: tuple[float, ...]) -> Image.Image:
    """The ``box`` region of an 8-bit or 16/32-bit integer image resampled to ``target`` as the towers
    resample (antialiased bilinear), with exact geometry (a DCT-scaled image's last pixels cover only part
    of a block). A deep image's bit depth is read before (``_effective_bits``): averaging lowers the
    maximum. Float images are left whole (their scaling reads the minimum and maximum).
    """
    if img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I;16", "I") or \
            (img.size == target and tuple(box) == (0, 0, *target)):
        return img
    return img.resize(target, Image.Resampling.BILINEAR, box=box)


def _effective_bits(img: Image.Image) -> int | None:
    """The effective bit depth of a grey image deeper than 8 bits and without negative values (as
    ``to_unit`` reads it), from the whole image; None for other images."""
    if img.mode not in ("I;16", "I"):
        return None
    low, high = img.getextrema()
    return max(8, int(high).bit_length()) if low >= 0 else None


def _too_large(size: tuple[int, int], limits: Limits) -> str:
    return (f"The image is {size[0]} x {size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.0f} megapixels.")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Colour as uint8 or float in [0, 1], (H, W, 3) on black; grey as decoded, (H, W) (``image_sample``
    scales it into the Sample without a float copy of its own)."""
    mode = img.mode
    if mode in ("L", "1") or mode.startswith("I") or mode == "F":
        return np.asarray(img)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:4]
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as exc:  # a colour model PIL cannot convert (e.g. LAB TIFF)
        raise UnsupportedFormatError(f"Images in the '{mode}' colour model are not supported.") from exc


def _bytes_per_band(mode: str) -> int:
    """Bytes per sample of a PIL mode once decoded (1-bit images are unpacked to a byte a pixel)."""
    if mode.startswith("I;16"):
        return 2
    if mode in ("I", "F") or mode.startswith(("I;32", "F;32")):
        return 4
    return 1


def _bit_depth(mode: str) -> int:
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 8
