"""Typed errors for everything that comes from outside: files, bytes, user choices.

Every message is written for a clinician reading it in the app, not for a developer.
"""


class InputError(ValueError):
    """A file or value from the outside world that M3Bind cannot use."""


class UnsupportedFormatError(InputError):
    """The file type, DICOM object or encoding is not one M3Bind reads."""


class CorruptFileError(InputError):
    """The file claims a supported format but its content is broken or truncated."""


class InputTooLargeError(InputError):
    """The input exceeds a configured size limit (bytes, pixels, frames, samples)."""


class WrongModalityError(InputError):
    """The input does not fit the modality asked for, or the model has no encoder for it."""
