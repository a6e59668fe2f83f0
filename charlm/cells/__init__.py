"""Recurrent cells: one module per cell, each a class that implements the contract in base.py,
registered by name. Importing this package registers the built-in cells."""

from charlm.cells import gru, lstm, rnn, peephole, mingru, minlstm  # noqa: F401, I001  (registers them, in this order)
from charlm.cells.base import (
    Cell,
    EquationDecoder,
    State,
    cell_class,
    cell_names,
    register,
    unregister,
)

__all__ = ["Cell", "EquationDecoder", "State", "cell_class", "cell_names", "register", "unregister"]
