"""charlm: character-level recurrent language models, from Python and from the command line.

    import charlm
    lm = charlm.load("run/best.safetensors")
    print(lm.generate("ROMEO:", length=200, temperature=0.8, seed=1))

`import charlm` is cheap: torch and the model code are imported when a name that needs them is
first used (charlm.load, charlm.train, ...). The API itself lives in charlm/api/; see docs/api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from charlm.errors import CharlmError, CheckpointError, DataError, OptionError

__version__ = "0.1.0"

# Public names served from charlm.api on first use (PEP 562), so that importing the package
# (the CLI's --help, --version and completion included) never imports torch.
_API_NAMES = (
    "load",
    "LanguageModel",
    "Streams",
    "Score",
    "Beam",
    "Event",
    "checkpoint_info",
    "prepare",
    "train",
    "TrainResult",
    "Progress",
)

__all__ = ["CharlmError", "CheckpointError", "DataError", "OptionError", "__version__", *_API_NAMES]

if TYPE_CHECKING:
    from charlm.api import (  # noqa: F401
        Beam,
        Event,
        LanguageModel,
        Progress,
        Score,
        Streams,
        TrainResult,
        checkpoint_info,
        load,
        prepare,
        train,
    )


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        import charlm.api

        return getattr(charlm.api, name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
