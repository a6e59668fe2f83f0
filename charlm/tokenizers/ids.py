"""Token ids on disk: the smallest unsigned dtype for a vocabulary's size (shared by every vocabulary kind)."""

from __future__ import annotations

import numpy as np


def id_dtype_for(size: int):
    """Smallest unsigned dtype that holds every id of a vocabulary of this size."""
    return np.uint8 if size <= 256 else np.uint16 if size <= 65536 else np.uint32
