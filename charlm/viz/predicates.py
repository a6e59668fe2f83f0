"""Properties of a text, one number per character, and how well a cell's activation tracks them.

Each property is the state of the text after reading a character (what a cell could know then):
binary ones (inside a quote, a comment, a regex match) are ranked by the point-biserial
correlation (Pearson's r against a 0/1 variable), counts (column, bracket depth, indent) by
Spearman's rho (Pearson's r on ranks, ties given their average rank). Written with torch: no scipy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from charlm.errors import CharlmError

TAB = 8  # columns per tab stop, for indent


def quote(text: str) -> np.ndarray:
    """1 from an opening double quote up to (not including) its closing one: "..." and “...”; a line break ends a quote."""
    out = np.zeros(len(text), dtype=np.float32)
    inside = False
    for i, c in enumerate(text):
        if c == "\n":
            inside = False
        elif c == '"':
            inside = not inside
        elif c == "\u201c":
            inside = True
        elif c == "\u201d":
            inside = False
        out[i] = inside
    return out


def line_position(text: str) -> np.ndarray:
    """The column after reading each character: 1 for a line's first character, 0 for the line break."""
    out = np.zeros(len(text), dtype=np.float32)
    col = 0
    for i, c in enumerate(text):
        col = 0 if c == "\n" else col + 1
        out[i] = col
    return out


def bracket_depth(text: str) -> np.ndarray:
    """C's {} nesting after each character; a text starting mid-file is shifted so its shallowest point is 0."""
    steps = np.fromiter(((c == "{") - (c == "}") for c in text), dtype=np.float32, count=len(text))
    depth = np.cumsum(steps)
    return depth - min(0.0, float(depth.min())) if len(depth) else depth


def comment(text: str) -> np.ndarray:
    """1 inside a C comment, /* ... */ or // to the end of the line, delimiters included; strings and
    character literals are skipped, so "http://" is not a comment."""
    out = np.zeros(len(text), dtype=np.float32)
    i, n, mode = 0, len(text), None  # mode: None, "block", "line", '"' or "'"
    while i < n:
        c, nxt = text[i], text[i + 1] if i + 1 < n else ""
        if mode is None:
            if c == "/" and nxt in "*/" and nxt:
                mode = "block" if nxt == "*" else "line"
                out[i : i + 2] = 1
                i += 2
                continue
            if c in "\"'":
                mode = c
        elif mode == "block":
            out[i] = 1
            if c == "*" and nxt == "/":
                out[i + 1] = 1
                mode, i = None, i + 2
                continue
        elif mode == "line":
            if c == "\n":
                mode = None
            else:
                out[i] = 1
        else:  # inside a string or a character literal
            if c == "\\":
                i += 2
                continue
            if c == mode or c == "\n":
                mode = None
        i += 1
    return out


def indent(text: str) -> np.ndarray:
    """The indentation of each character's line, in columns (a tab to the next multiple of 8)."""
    out = np.zeros(len(text), dtype=np.float32)
    start = 0
    for line in text.splitlines(keepends=True):
        width = 0
        for c in line:
            if c == " ":
                width += 1
            elif c == "\t":
                width = (width // TAB + 1) * TAB
            else:
                break
        out[start : start + len(line)] = width
        start += len(line)
    return out


def regex(pattern: str) -> Callable[[str], np.ndarray]:
    """1 on every character inside a match of the pattern."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise CharlmError(f"--find regex:{pattern} is not a valid regular expression ({e})") from None

    def inside(text: str) -> np.ndarray:
        out = np.zeros(len(text), dtype=np.float32)
        for m in compiled.finditer(text):
            out[m.start() : m.end()] = 1
        return out

    return inside


@dataclass(frozen=True)
class Predicate:
    name: str
    binary: bool  # point-biserial if so, else Spearman
    fn: Callable[[str], np.ndarray]

    @property
    def method(self) -> str:
        return "point-biserial" if self.binary else "spearman"


BUILTINS = {
    "quote": Predicate("quote", True, quote),
    "line-position": Predicate("line-position", False, line_position),
    "bracket-depth": Predicate("bracket-depth", False, bracket_depth),
    "comment": Predicate("comment", True, comment),
    "indent": Predicate("indent", False, indent),
}
REGEX_PREFIXES = ("regex:", "re:")


def predicate(spec: str) -> Predicate:
    """A built-in property by name, or `regex:PATTERN` (inside a match)."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    for prefix in REGEX_PREFIXES:
        if spec.startswith(prefix):
            pattern = spec[len(prefix) :]
            if not pattern:
                raise CharlmError("--find regex: needs a pattern, e.g. --find 'regex:[0-9]+'")
            return Predicate(spec, True, regex(pattern))
    raise CharlmError(f"unknown --find predicate {spec!r}: use one of {', '.join(BUILTINS)}, or regex:PATTERN")


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson's r between each column of x (N, K) and y (N,): (K,). A constant column or y gives 0."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean()
    den = x.norm(dim=0) * y.norm()
    r = (x * y[:, None]).sum(0) / den
    return torch.where(den > 0, r, torch.zeros_like(r)).clamp(-1, 1)


def ranks(x: Tensor) -> Tensor:
    """Ranks (1..N) down each column of x (N, K) or of a vector; tied values share their average rank."""
    vector = x.dim() == 1
    x = x[:, None] if vector else x
    n = x.shape[0]
    values, order = x.sort(dim=0)
    pos = torch.arange(n, device=x.device)[:, None].expand_as(values)
    new = torch.ones_like(values, dtype=torch.bool)
    new[1:] = values[1:] != values[:-1]  # the first of each run of equal values
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=0).values
    last_new = torch.ones_like(new)
    last_new[:-1] = new[1:]  # the last of each run
    last = torch.where(last_new, pos, torch.full_like(pos, n - 1)).flip(0).cummin(dim=0).values.flip(0)
    avg = (first + last).double() / 2 + 1
    out = torch.empty_like(avg).scatter_(0, order, avg)
    return out[:, 0] if vector else out


def correlate(acts: Tensor, target: np.ndarray, binary: bool, ranked: Tensor | None = None) -> Tensor:
    """How well each column of acts (N, K) tracks target (N,): point-biserial r if binary, else Spearman's rho.
    `ranked`: ranks(acts), when the caller has them already (several count properties share them)."""
    y = torch.from_numpy(np.asarray(target, dtype=np.float64))
    if binary:
        return pearson(acts, y)
    return pearson(ranks(acts.float()) if ranked is None else ranked, ranks(y))


class Finder:
    """Every cell of every layer, acts (N, L, H), ranked against one property after another (the
    activations' ranks, which Spearman needs, computed once)."""

    def __init__(self, acts: Tensor):
        self.n, self.layers, self.hidden = acts.shape
        self.flat = acts.reshape(self.n, self.layers * self.hidden)
        self._ranked = None

    def top(self, target: np.ndarray, binary: bool, count: int) -> list[dict]:
        """The `count` cells with the largest |r| against target, best first, as records."""
        if not binary and self._ranked is None:
            self._ranked = ranks(self.flat.float())
        r = correlate(self.flat, target, binary, self._ranked)
        order = r.abs().argsort(descending=True)[:count].tolist()
        return [{"layer": i // self.hidden, "cell": i % self.hidden, "r": round(float(r[i]), 4)} for i in order]


def find(acts: Tensor, target: np.ndarray, binary: bool, top: int) -> list[dict]:
    """Every cell of every layer, acts (N, L, H), ranked by |r| against target: the best `top` as records."""
    return Finder(acts).top(target, binary, top)
