"""Typed errors for everything that comes from outside: files, bytes, user choices.

Every message is written for a clinician reading it in the app, not for a developer.
"""


class InputError(ValueError):
    """A file or value from the outside world that M3Bind cannot use."""


class UnsupportedFormatError(InputError):
    """The file type, DICOM object or encoding is not one M3Bind reads."""


class CorruptFileError(InputError):
    """The file claims a supported format but its content is broken or truncated."""


class MissingFileError(CorruptFileError):
    """A file the input needs is absent or cannot be opened: a path that does not exist, or a WFDB record
    without its header or signal file (an incomplete input, hence a kind of ``CorruptFileError``)."""


class InputTooLargeError(InputError):
    """The input exceeds a configured size limit (bytes, pixels, frames, samples)."""


class WrongModalityError(InputError):
    """The input does not fit the modality asked for, or the model has no encoder for it."""


class OptionError(InputError):
    """A value the caller chose (DICOM window, ECG sampling rate) is unusable or contradicts the file, or one
    the file needs (the sampling rate of a CSV/NPY ECG that states none) was not given."""
