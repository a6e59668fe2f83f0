"""Recurrent cells: one module per cell, each a class that implements the contract in base.py,
registered by name.

The registry's names (Cell, cell_class, cell_names, register, ...) are served on first use
(PEP 562), which imports torch and registers the built-in cells; `BUILTIN_CELLS` names those cells
without importing anything, for `charlm train --help` (tests/test_imports.py checks it against the
registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

BUILTIN_CELLS = ("gru", "lstm", "rnn", "peephole", "mingru", "minlstm")  # in registry order

_REGISTRY_NAMES = ("Cell", "EquationDecoder", "State", "cell_class", "cell_names", "register", "unregister")

__all__ = ["BUILTIN_CELLS", *_REGISTRY_NAMES]

if TYPE_CHECKING:
    from charlm.cells.base import Cell, EquationDecoder, State, cell_class, cell_names, register, unregister  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from charlm.cells import base, gru, lstm, rnn, peephole, mingru, minlstm  # noqa: F401, I001  (registers them, in this order)

        for public in _REGISTRY_NAMES:  # served from here on without this hook
            globals()[public] = getattr(base, public)
        return globals()[name]
    raise AttributeError(f"module 'charlm.cells' has no attribute {name!r}")
