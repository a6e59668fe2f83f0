"""Declaring an option once: its help sentence, the values it accepts (and how its error says so),
and its flag's form. charlm/config.py declares every option with `option(...)`; the checks, the
flags' help with their defaults, the YAML keys and the API's keywords are derived from that.

Light on purpose: `charlm train --help` reads these declarations without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_COUNT = (1 << 63) - 1  # seeds, step counts: what a signed 64-bit integer holds (torch's seeds, JSON readers)


@dataclass(frozen=True)
class Check:
    """The values an option accepts, and how its error says so: '{name} must be {need}{note} (got {value})'."""

    ok: Callable[[Any], bool]
    need: str  # "between 1 and 64", "in [0, 1)", "positive" (a choice: "one of" and the names valid now)
    note: str = ""  # why, after the need: " (0 disables clipping)"
    got: bool = True  # whether the message ends with the value given
    choices: tuple[str, ...] | None = None  # a choice: the names the help lists
    current: Callable[[], tuple[str, ...]] | None = None  # a choice: the names valid now

    def message(self, name: str, value: Any) -> str:
        """The one-line error for a value this check refuses."""
        if self.current is not None:
            return f"{name} must be one of {', '.join(self.current())} (got {value!r})"
        return f"{name} must be {self.need}{self.note}" + (f" (got {value})" if self.got else "")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value).removesuffix(".0") if isinstance(value, float) else str(value)  # 0.002, 5, 1e-05: as written


def _count(n: float) -> str:
    return "2^63-1" if n == MAX_COUNT else _shown(n)


def between(low: float, high: float, note: str = "") -> Check:
    """low <= value <= high, said as 'between LOW and HIGH (got V)'."""
    return Check(lambda v: low <= v <= high, f"between {_count(low)} and {_count(high)}", note)


def interval(text: str, note: str = "", got: bool = False) -> Check:
    """An interval in its usual notation, '[0, 1)' or '(0, 1]', said as 'in [0, 1)'."""
    m = re.fullmatch(r"([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])", text)
    if m is None:
        raise ValueError(f"not an interval: {text!r}")
    low, high = float(m.group(2)), float(m.group(3))
    closed_low, closed_high = m.group(1) == "[", m.group(4) == "]"

    def ok(v: float) -> bool:
        return (low <= v if closed_low else low < v) and (v <= high if closed_high else v < high)

    return Check(ok, f"in {text}", note, got)


def positive(got: bool = False) -> Check:
    """value > 0."""
    return Check(lambda v: v > 0, "positive", got=got)


def at_least(low: float, note: str = "") -> Check:
    """value >= low, said as '>= LOW'."""
    return Check(lambda v: v >= low, f">= {_shown(low)}", note, got=False)


def one_of(choices: tuple[str, ...], current: Callable[[], tuple[str, ...]] | None = None) -> Check:
    """A name among `choices`; `current`, if given, says which names are valid now (a registry that
    may grow at run time), while the help lists `choices` (known without importing the registry)."""
    names = current or (lambda: choices)
    return Check(lambda v: v in names(), "one of", choices=choices, current=names)


@dataclass(frozen=True)
class Option:
    """What a config field declares besides its type and default: help, accepted values, flag form."""

    help: str  # one sentence without the default, which is added from the field; {choices} lists a choice's names
    check: Check | None = None
    flag_type: type | None = None  # what the flag reads when it is not the field's type (time_budget: "90s")
    switch: bool = False  # a flag given alone (--compile), not followed by a value
    internal: bool = False  # set by charlm itself, never an option (vocab_size: from the data)


def option(default: Any, help: str, check: Check | None = None, **kwargs: Any) -> Any:
    """A config field declared as an option: its default, its help sentence and the values it accepts."""
    return field(default=default, metadata={"option": Option(help, check, **kwargs)})


@dataclass(frozen=True)
class Declared:
    """One option as the CLI and the API see it: its name, value type, default and declaration."""

    name: str
    section: str  # model or train
    type: type  # int, float, str or bool (None is allowed where `nullable`)
    nullable: bool
    default: Any
    option: Option

    @property
    def help(self) -> str:
        """The help sentence, with the accepted names and the default taken from the declaration itself."""
        check = self.option.check
        names = check.choices if check is not None and check.choices else ()
        text = self.option.help.format(choices=", ".join(names[:-1]) + f" or {names[-1]}" if names else "")
        if self.default is not None:
            default = f"default: {_shown(self.default)}"
            text = f"{text[:-1]}; {default})" if text.endswith(")") else f"{text} ({default})"  # one parenthesis, not two
        return text + "."
