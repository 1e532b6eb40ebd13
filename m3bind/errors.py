"""Typed errors: who caused a failure decides its type.

::

    M3BindError                 every error M3Bind raises on purpose
    ├── InputError (ValueError) a file, bytes or a choice from the outside world (the person using the app or
    │   │                       the CLI) that M3Bind cannot use; its message is written for that person
    │   ├── UnsupportedFormatError, CorruptFileError (MissingFileError), InputTooLargeError,
    │   │   WrongModalityError, OptionError
    │   └── LibraryMismatchError: a library and a model (or vectors) of different embedding spaces
    ├── ConfigError (ValueError) a developer's fault: an invalid model or training config, an argument that
    │                           contradicts the API (mismatched lengths, an unknown item field); a message
    │                           for the programmer, never shown to a clinician as their mistake
    └── UnknownItemError (KeyError) an item id that the library does not hold (removed, or never added)

Code that shows errors to people catches ``InputError``; a ``ConfigError`` reaching them is a bug to fix.
"""


class M3BindError(Exception):
    """Base of every error that M3Bind raises on purpose."""


class InputError(M3BindError, ValueError):
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
    """A value the caller chose (DICOM window, ECG sampling rate, number of results) is unusable or contradicts
    the file, or one the file needs (the sampling rate of a CSV/NPY ECG that states none) was not given."""


class LibraryMismatchError(InputError):
    """The library and the model (or the vectors given) come from different embedding spaces."""


class ConfigError(M3BindError, ValueError):
    """A developer's fault: an invalid config (model, tower, library settings, training) or a call that
    contradicts the API. Not the fault of whoever sent a file."""


class UnknownItemError(M3BindError, KeyError):
    """The library holds no item with this id (it was removed, or never added)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown item"
