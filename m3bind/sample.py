"""The one form every reader produces and every encoder consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """A decoded input, ready for a modality tower.

    ``data`` is canonical per reader kind:
      * image: float32 (H, W, 3) in [0, 1] (grey inputs are replicated to three channels);
      * ecg: float32 (12, 1000) in millivolts, the 12 standard leads (``m3bind.readers.ecg.LEADS``)
        at 100 Hz for 10 s; leads the record lacks are zeros and ``meta["lead_mask"]`` marks them False.
    ``preview`` is what a person should see: uint8 (h, w, 3) for images, the same (12, 1000) signal
    for ECGs (plotted by the app).
    ``meta`` holds only non-identifying facts (format, size, sampling rate, DICOM technical tags);
    readers never put patient identifiers in it.
    """

    modality: str
    data: np.ndarray
    preview: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        from .modalities import get_modality

        return get_modality(self.modality).kind
