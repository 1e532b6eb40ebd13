"""M3Bind: medical imaging modalities and ECGs bound into one embedding space through shared text.

The public API, used alike by the app, the CLI, ``train/`` and the tests::

    import m3bind
    model = m3bind.load_model()
    sample = m3bind.load_input("scan.dcm")
    model.classify(sample, ["normal chest x-ray", "pneumonia"])
"""

from .errors import (ConfigError, CorruptFileError, InputError, InputTooLargeError, M3BindError, MissingFileError,
                     OptionError, UnknownItemError, UnsupportedFormatError, WrongModalityError)
from .modalities import Modality, get_modality, modality_names, register
from .readers import Limits, load_input
from .sample import Sample

# The model side pulls in torch (about 0.5 GB) and the library faiss: loaded on first use, so that a process
# that only reads files or searches a library stays small, and the CLI answers --help at once.
_LAZY = {
    "EcgTowerConfig": ".config", "ImageTowerConfig": ".config", "ModelConfig": ".config",
    "TextTowerConfig": ".config", "default_config": ".config",
    "M3BindModel": ".model", "load_model": ".model",
    "Hit": ".library", "Library": ".library", "LibraryMismatchError": ".library",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm3bind' has no attribute {name!r}")

__all__ = [
    "ConfigError", "CorruptFileError", "InputError", "InputTooLargeError", "M3BindError", "MissingFileError",
    "OptionError", "UnknownItemError", "UnsupportedFormatError", "WrongModalityError",
    "Modality", "get_modality", "modality_names", "register",
    "Limits", "load_input", "Sample",
    "EcgTowerConfig", "ImageTowerConfig", "ModelConfig", "TextTowerConfig", "default_config",
    "M3BindModel", "load_model",
    "Hit", "Library", "LibraryMismatchError",
]
