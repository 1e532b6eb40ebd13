"""M3Bind: medical imaging modalities and ECGs bound into one embedding space through shared text.

The public API, used alike by the app, the CLI, ``train/`` and the tests::

    import m3bind
    model = m3bind.load_model()
    sample = m3bind.load_input("scan.dcm")
    model.classify(sample, ["normal chest x-ray", "pneumonia"])
"""

from .errors import CorruptFileError, InputError, InputTooLargeError, UnsupportedFormatError, WrongModalityError
from .modalities import Modality, get_modality, modality_names, register
from .readers import Limits, load_input
from .sample import Sample
from .config import EcgTowerConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, default_config
from .model import M3BindModel, load_model
from .library import Hit, Library, LibraryMismatchError

__all__ = [
    "CorruptFileError", "InputError", "InputTooLargeError", "UnsupportedFormatError", "WrongModalityError",
    "Modality", "get_modality", "modality_names", "register",
    "Limits", "load_input", "Sample",
    "EcgTowerConfig", "ImageTowerConfig", "ModelConfig", "TextTowerConfig", "default_config",
    "M3BindModel", "load_model",
    "Hit", "Library", "LibraryMismatchError",
]
