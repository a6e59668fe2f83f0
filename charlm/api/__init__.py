"""charlm's public Python API: what `import charlm` offers, and what the CLI, the server and the exporter stand on.

    import charlm
    lm = charlm.load("run/best.safetensors")          # one checkpoint, or several: an ensemble
    text = lm.generate("ROMEO:", length=200, temperature=0.8, seed=1)
    bpc = lm.score("To be, or not to be").bits_per_char

See docs/api.md for the whole tour. Errors are charlm.CharlmError subclasses (OptionError,
DataError, CheckpointError) carrying the messages the CLI prints; nothing here prints or exits.
"""

from __future__ import annotations

from charlm.api.model import Beam, LanguageModel, Score, checkpoint_info, load
from charlm.api.training import Progress, TrainResult, prepare, train
from charlm.decoding.streams import Event, Streams

__all__ = [
    "Beam",
    "Event",
    "LanguageModel",
    "Progress",
    "Score",
    "Streams",
    "TrainResult",
    "checkpoint_info",
    "load",
    "prepare",
    "train",
]
