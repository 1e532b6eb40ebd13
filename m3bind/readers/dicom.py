"""DICOM objects (images and ECG waveforms) into a ``Sample``, with pydicom 3.

Policies, chosen once here:
  * a multi-frame image yields its **middle frame** (index ``frames // 2``; ``meta["frames"]`` and
    ``meta["frame_used"]`` say so), the one most likely to show the anatomy of interest;
  * grey images go through the Modality LUT / Rescale Slope-Intercept, then the VOI: the ``window``
    argument if given, else the file's first Window Center/Width (its VOI LUT Function honoured), else
    its VOI LUT Sequence, else a window over the 0.5-99.5 percentiles of the frame's values (padding
    excluded); MONOCHROME1 is inverted after windowing so that bone is always bright;
  * colour images become RGB: YBR_* (including JPEG 2000's YBR_RCT/ICT) are converted by pydicom's
    decoders themselves, PALETTE COLOR through its colour LUT; compressed transfer syntaxes are decoded by
    pydicom's decoders with the pylibjpeg plugins (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
    HTJ2K), Pillow where it can, and pydicom's own RLE decoder;
  * sizes are checked from the header before any pixel is decoded;
  * ``meta`` is built from a whitelist of technical attributes; nothing else in the header is read,
    so no patient, institution or study identifier can reach it (or pydicom's warnings);
  * waveforms (ECG) go to ``m3bind.readers.ecg.sample_from_signal``; segmentations, structured reports,
    RT objects and other objects without pixels are refused with a message naming what they are.
"""

from __future__ import annotations

import re
import warnings
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import CorruptFileError, InputError, InputTooLargeError, OptionError, UnsupportedFormatError
from ..kinds import IMAGE, input_kind
from ..modalities import modality_for_dicom_code
from ..sample import Sample
from . import Limits, check_decoded_size
from .image import _BAND, _fit, guess_image_modality, image_sample, to_unit

_NOT_IMAGES = {
    "SEG": "a segmentation object (SEG)",
    "RTSTRUCT": "a radiotherapy structure set (RTSTRUCT)",
    "RTPLAN": "a radiotherapy plan (RTPLAN)",
    "RTDOSE": "a radiotherapy dose grid (RTDOSE)",
    "RTRECORD": "a radiotherapy treatment record (RTRECORD)",
    "SR": "a structured report (SR)",
    "KO": "a key object selection (KO)",
    "PR": "a presentation state (PR)",
    "REG": "a spatial registration object (REG)",
    "DOC": "an encapsulated document (DOC)",
    "AU": "an audio recording (AU)",
}
_ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
}
_AUDIO_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.9.4.1", "1.2.840.10008.5.1.4.1.1.9.4.2"}
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"}
_TO_MILLIVOLT = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")  # the DICOM CS alphabet: anything else is not a code
# Body Part Examined (0018,0015): only the defined terms of PS3.16 Annex L (CID 4031 and its older
# values) pass; a site's own text (a name, an accession, a free note, up to 16 characters) is dropped.
BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA APPENDIX ARM AXILLA BACK BILEDUCT
    BLADDER BRAIN BRAINSTEM BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST
    CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE
    DUODENUM EAR ELBOW ENDOMETRIUM ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT FOREARM GALLBLADDER
    HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE
    LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY
    PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RADIUS RECTUM RETINA RIB SACRUM SCAPULA SCLERA
    SCROTUM SELLA SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TEMPORALBONE TESTIS
    THIGH THORAX THUMB THYMUS THYROID TIBIA TLSPINE TOE TONGUE TRACHEA TSPINE ULNA URETER URETHRA UTERUS
    VAGINA VULVA WHOLEBODY WRIST ZYGOMA
    """.split())


def read_dicom(data: bytes, limits: Limits, window: tuple[float, float] | None = None,
               decode_size: int | None = None) -> Sample:
    """Read a DICOM image (one frame) or ECG waveform; ``window`` = (centre, width) overrides the VOI.
    ``decode_size``: as for ``read_image``, a grey image larger than that is shrunk, once windowed."""
    user_window = _user_window(window) if window is not None else None
    ds = _parse(data)
    try:
        return _route(ds, limits, user_window, decode_size)
    except InputError:
        raise
    except Exception as exc:  # decoder or pixel-processing failure on content the header promised
        raise CorruptFileError(
            "The DICOM data is damaged or inconsistent with its header and could not be decoded.") from exc


def _route(ds: Dataset, limits: Limits, window: tuple[float, float] | None, decode_size: int | None) -> Sample:
    """Images to the image path, waveforms to the ECG reader, everything else refused by name."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    code = _code(ds, "Modality") or ""
    if _NOT_IMAGES.get(code) or sop_class in _AUDIO_SOP_CLASSES:
        what = _NOT_IMAGES.get(code) or "an audio recording"
        raise UnsupportedFormatError(
            f"This DICOM file is {what}, not an image or an ECG; M3Bind reads DICOM images and ECG waveforms.")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "WaveformSequence" in ds or sop_class in _ECG_SOP_CLASSES:
            return _read_waveform(ds, limits)
        kind = _uid_name(sop_class) or ""
        if "Image Storage" in kind:
            raise CorruptFileError(f"This DICOM file is a '{kind}' object but its pixel data is missing; "
                                   "the file is incomplete or was exported without the image.")
        what = f"a '{kind}' object" if kind else "a DICOM object"
        raise UnsupportedFormatError(f"This DICOM file is {what} with no image or waveform data in it.")
    return _read_image(ds, limits, window, decode_size)


def _parse(data: bytes) -> Dataset:
    """Parse the whole header; a file without the 'DICM' preamble must prove it is DICOM."""
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    buffer = BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings may quote header values
            ds = pydicom.dcmread(buffer, force=not has_preamble)
            first = next(iter(ds.keys()), None)
    except Exception as exc:
        raise CorruptFileError("The DICOM file is damaged or truncated: its header cannot be read.") from exc
    if not has_preamble and (first is None or first.group not in (0x0002, 0x0008) or not any(
            k in ds for k in ("SOPClassUID", "PixelData", "WaveformSequence"))):
        raise UnsupportedFormatError("This file is not a DICOM file (it has no DICOM header).")
    # pydicom stops quietly at a premature end of file: parsing then ends early, or the last value is short
    try:  # elements() converts raw values: a damaged VR or value fails here, not in dcmread
        short = buffer.tell() < len(data) or any(
            isinstance(elem, RawDataElement) and elem.value is not None and elem.length != 0xFFFFFFFF
            and len(elem.value) < elem.length for elem in ds.elements())
    except Exception as exc:
        raise CorruptFileError("The DICOM file is damaged or truncated: its header cannot be read.") from exc
    if short:
        raise CorruptFileError("The DICOM file is truncated: it ends before the data its header announces.")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _read_image(ds: Dataset, limits: Limits, window: tuple[float, float] | None,
                decode_size: int | None) -> Sample:
    frames, photometric = _check_pixel_module(ds, limits)
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedFormatError(
            f"The DICOM image is encoded as '{tsyntax.name}', which M3Bind cannot decode.") from None
    if not decoder.is_available:
        raise UnsupportedFormatError(
            f"The DICOM image is compressed as '{tsyntax.name}' and no decoder for it is installed.")
    frame = frames // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr, props = decoder.as_array(ds, index=frame)
    decoded_as = str(props.get("photometric_interpretation", photometric))  # YBR_* arrive as RGB
    ds = _frame_attributes(ds, frame)
    meta = _technical_meta(ds, tsyntax)
    meta.update(frames=frames, frame_used=frame)

    if decoded_as in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise CorruptFileError("The DICOM header says the image is grey but its pixels have colour samples.")
        rgb, voi_meta = _grey(arr, ds, window, decoded_as == "MONOCHROME1")
        del arr
        rgb = _shrink_unit(rgb, decode_size)
        meta.update(voi_meta)
        if meta.get("modality_code") == "CT":
            meta["hu_range"] = meta["value_range"]
    elif decoded_as == "PALETTE COLOR":
        rgb = to_unit(apply_color_lut(arr, ds))
    elif decoded_as == "RGB":
        rgb = to_unit(arr, bits=int(ds.get("BitsStored") or ds.BitsAllocated))
    else:
        raise UnsupportedFormatError(f"DICOM images in the '{decoded_as}' colour model are not supported.")

    known = modality_for_dicom_code(meta.get("modality_code", ""))
    if known is not None and input_kind(known.kind) is IMAGE:  # a header may name a modality of another kind
        modality, meta["modality_source"] = known.name, "dicom"
    else:
        modality, meta["modality_source"] = guess_image_modality(rgb), "guess"
    return image_sample(rgb, modality, meta)


def _check_pixel_module(ds: Dataset, limits: Limits) -> tuple[int, str]:
    """Validate the Image Pixel module and the limits from the header alone; return (frames, photometric)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError("The DICOM image is missing its size or pixel format (Rows, Columns, "
                               "Bits Allocated or Photometric Interpretation).") from exc
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptFileError(f"The DICOM header declares an empty image ({rows} x {cols}, {frames} frames).")
    if bits not in (1, 8, 16, 32, 64):
        raise CorruptFileError(f"The DICOM header declares an invalid Bits Allocated value ({bits}).")
    if samples not in (1, 3):
        raise CorruptFileError(f"The DICOM header declares {samples} samples per pixel; 1 or 3 are valid.")
    if photometric not in _PHOTOMETRIC:
        shown = f"'{photometric}'" if _CODE_STRING.match(photometric) else "an unrecognised value"
        raise UnsupportedFormatError(f"The DICOM image uses the photometric interpretation {shown}, "
                                     "which M3Bind does not support.")
    if rows * cols > limits.max_pixels:
        raise InputTooLargeError(f"The DICOM image is {cols} x {rows} pixels ({rows * cols / 1e6:.0f} "
                                 f"megapixels); the limit is {limits.max_pixels / 1e6:.0f} megapixels.")
    if frames > limits.max_frames:
        raise InputTooLargeError(f"The DICOM file has {frames} frames; the limit is {limits.max_frames}.")
    check_decoded_size(cols, rows, samples, max(1, bits // 8), limits,  # the one frame decoded; 1-bit unpacked
                       what="The DICOM image" if frames == 1 else "Each frame of the DICOM image")
    return frames, photometric


def _frame_attributes(ds: Dataset, frame: int) -> Dataset:
    """``ds`` with an enhanced multi-frame object's shared and per-frame rescale/VOI values lifted to the top."""
    groups = [seq[0] for seq in (ds.get("SharedFunctionalGroupsSequence"),) if seq]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for item in groups:
        for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence", "PixelMeasuresSequence"):
            if item.get(keyword):
                for elem in item[keyword][0]:
                    ds[elem.tag] = elem
    return ds


def _grey(raw: np.ndarray, ds: Dataset, window: tuple[float, float] | None,
          invert: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality values, then the VOI, to [0, 1] float32; returns the image and what was applied.

    Memory: the modality values (float64, as the standard's arithmetic needs) exist a band of rows at a
    time, windowed straight into the float32 result; only the default window's percentiles read them whole.
    """
    if window is not None:
        (centre, width), function, source = window, "LINEAR_EXACT", "user"
    elif (header := _header_window(ds)) is not None:
        centre, width, function = header
        source = "dicom"
    elif ds.get("VOILUTSequence") and "LUTData" in ds.VOILUTSequence[0]:
        return _grey_voi_lut(raw, ds, invert)
    else:
        (centre, width), function, source = _default_window(raw, ds), "LINEAR_EXACT", "default"
    unit = np.empty(raw.shape, dtype=np.float32)
    low, high = np.inf, -np.inf
    for rows in _bands(raw):
        values = _modality(raw[rows], ds)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        windowed = _apply_window(values, centre, width, function)
        unit[rows] = 1.0 - windowed if invert else windowed
    meta = {"value_range": [low, high], "window_source": source,
            "window": [round(float(centre), 4), round(float(width), 4)]}
    return unit, meta


def _bands(raw: np.ndarray) -> list[slice]:
    """Bands of rows of about ``_BAND`` values (8 MB as float64)."""
    rows = max(1, _BAND // max(1, raw[0].size if raw.ndim > 1 else 1))
    return [slice(start, start + rows) for start in range(0, len(raw), rows)]


def _modality(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT or rescale applied, in float64."""
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)


def _default_window(raw: np.ndarray, ds: Dataset) -> tuple[float, float]:
    """The window over the 0.5-99.5 percentiles of the modality values, padding pixels left out."""
    pad = ds.get("PixelPaddingValue")
    kept = raw[raw != pad] if isinstance(pad, int) and (raw != pad).any() else raw.reshape(-1)
    values = np.empty(kept.shape, dtype=np.float64)
    for rows in _bands(kept):
        values[rows] = _modality(kept[rows], ds)
    del kept
    lo, hi = np.percentile(values, [0.5, 99.5], overwrite_input=True)
    return float(lo + hi) / 2.0, max(float(hi - lo), 1e-6)


def _grey_voi_lut(raw: np.ndarray, ds: Dataset, invert: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """The VOI LUT of the file applied (rare, and its output depth is read from the whole image)."""
    values = _modality(raw, ds)
    meta: dict[str, Any] = {"value_range": [float(values.min()), float(values.max())], "window_source": "voi_lut"}
    depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    unit = to_unit(apply_voi(np.rint(values).astype(np.int64), ds), bits=depth)
    return (1.0 - unit if invert else unit).astype(np.float32), meta


def _shrink_unit(unit: np.ndarray, decode_size: int | None) -> np.ndarray:
    """A windowed grey image shrunk so its long side is ``decode_size`` (as the towers resample), before the
    Sample's three float channels are made; unchanged if it is not larger."""
    size = (unit.shape[1], unit.shape[0])
    if not decode_size or max(size) <= decode_size:
        return unit
    small = Image.fromarray(unit, mode="F").resize(_fit(size, decode_size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def _user_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        centre, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise OptionError("The window must be two numbers: (centre, width).") from None
    if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
        raise OptionError("The window width must be a positive number and the centre a finite number.")
    return centre, width


def _header_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The file's first Window Center/Width and VOI LUT Function, if present and usable."""
    try:
        centre, width = (float(_first(ds.get(keyword))) for keyword in ("WindowCenter", "WindowWidth"))
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
        return None
    return centre, width, str(ds.get("VOILUTFunction") or "LINEAR").upper()


def _first(value: Any) -> Any:
    """The first of a multi-valued attribute (files may list several windows), or the value itself."""
    return value[0] if isinstance(value, (list, MultiValue)) else value


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2-3, with output scaled to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR" and width > 1:
        centre, width = centre - 0.5, width - 1.0
    return np.clip((values - centre) / width + 0.5, 0.0, 1.0)


def _code(ds: Dataset, keyword: str) -> str | None:
    """A Code String attribute, only if it looks like one (so free text never slips through)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    value = str(value).strip().upper() if isinstance(value, str) else None
    return value if value and _CODE_STRING.match(value) else None


def _technical_meta(ds: Dataset, tsyntax: UID) -> dict[str, Any]:
    """The whitelisted, non-identifying header facts."""
    meta: dict[str, Any] = {}
    for key, keyword in (("modality_code", "Modality"), ("body_part_examined", "BodyPartExamined"),
                         ("photometric_interpretation", "PhotometricInterpretation"),
                         ("voi_lut_function", "VOILUTFunction")):
        if (value := _code(ds, keyword)) and (key != "body_part_examined" or value in BODY_PARTS):
            meta[key] = value
    for key, keyword in (("rows", "Rows"), ("columns", "Columns"), ("bits_allocated", "BitsAllocated"),
                         ("bits_stored", "BitsStored"), ("samples_per_pixel", "SamplesPerPixel")):
        if isinstance(value := ds.get(keyword), int):
            meta[key] = int(value)
    for key, keywords in (("pixel_spacing", ("PixelSpacing", "ImagerPixelSpacing")),
                          ("slice_thickness", ("SliceThickness",)), ("rescale_slope", ("RescaleSlope",)),
                          ("rescale_intercept", ("RescaleIntercept",))):
        for keyword in keywords:
            if (numbers := _numbers(ds, keyword)) is not None:
                meta[key] = numbers if len(numbers) > 1 else numbers[0]
                break
    for key, uid in (("transfer_syntax", tsyntax), ("sop_class", ds.get("SOPClassUID"))):
        if name := _uid_name(uid):
            meta[key] = name
    return meta


def _uid_name(uid: Any) -> str | None:
    """The dictionary name of a standard UID (a class or syntax, never an instance); None otherwise."""
    uid = UID(str(uid or "").strip())
    return uid.name if uid.name != str(uid) else None


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        numbers = [float(v) for v in (value if isinstance(value, (list, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(np.isfinite(numbers)) else None


def _read_waveform(ds: Dataset, limits: Limits) -> Sample:
    """The longest original multiplex group of an ECG waveform, in millivolts, handed to the ECG reader."""
    from . import ecg

    try:
        groups = list(ds.WaveformSequence)
        index = max(range(len(groups)), key=lambda i: (
            str(groups[i].get("WaveformOriginality", "")).upper() == "ORIGINAL",
            int(groups[i].NumberOfWaveformSamples) / float(groups[i].SamplingFrequency)))
        group = groups[index]
        n_samples, n_channels = int(group.NumberOfWaveformSamples), int(group.NumberOfWaveformChannels)
        fs = float(group.SamplingFrequency)
        channels = list(group.ChannelDefinitionSequence)
    except Exception as exc:
        raise CorruptFileError("The DICOM waveform is missing its channel count, sample count or "
                               "sampling frequency.") from exc
    if n_samples > limits.max_ecg_samples or n_channels > limits.max_ecg_leads:
        raise InputTooLargeError(f"The DICOM waveform has {n_channels} channels of {n_samples} samples; "
                                 f"the limits are {limits.max_ecg_leads} channels and "
                                 f"{limits.max_ecg_samples} samples.")
    if not (np.isfinite(fs) and fs > 0) or n_samples <= 0 or len(channels) != n_channels:
        raise CorruptFileError("The DICOM waveform header is inconsistent (sampling frequency, sample or "
                               "channel count).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signal = ds.waveform_array(index)
    except Exception as exc:
        raise CorruptFileError("The DICOM waveform data is damaged or shorter than its header says.") from exc
    keep, names, not_voltage = [], [], []
    for i, channel in enumerate(channels):
        unit = _channel_unit(channel)
        if unit in _TO_MILLIVOLT:
            signal[:, i] *= _TO_MILLIVOLT[unit]
            keep.append(i)
            names.append(_channel_name(channel, i))
        else:
            not_voltage.append(_channel_name(channel, i))
    if not keep:
        raise UnsupportedFormatError("The DICOM waveform has no channel measured in volts; it is not an ECG.")
    meta: dict[str, Any] = {"waveform_group": index, "dropped_leads": not_voltage}
    if label := _code(group, "MultiplexGroupLabel"):
        meta["waveform_label"] = label
    if code := _code(ds, "Modality"):
        meta["modality_code"] = code
    if sop_class := _uid_name(ds.get("SOPClassUID")):
        meta["sop_class"] = sop_class
    return ecg.sample_from_signal(np.ascontiguousarray(signal[:, keep], dtype=np.float32), fs, names, meta, limits)


def _channel_unit(channel: Dataset) -> str:
    """UCUM code of a channel's sensitivity; microvolts when the file states none (the ECG norm)."""
    units = channel.get("ChannelSensitivityUnitsSequence")
    if not units:
        return "uV"
    return str(units[0].get("CodeValue", "")).strip()


def _channel_name(channel: Dataset, index: int) -> str:
    source = channel.get("ChannelSourceSequence")
    if source and source[0].get("CodeMeaning"):
        return str(source[0].CodeMeaning).strip()
    return str(channel.get("ChannelLabel") or f"channel {index + 1}").strip()
