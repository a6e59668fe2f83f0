"""The page: one self-contained HTML file (inline CSS and JS, no fetch), the data inline as JSON.

The template is charlm/viz/page.html (package data); the data goes into a
<script type="application/json"> element, every "<" escaped so no text can close it.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from charlm.errors import CharlmError


def render(data: dict, title: str) -> str:
    """The page's HTML for the data `report.build` made."""
    template = resources.files("charlm.viz").joinpath("page.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write(path: Path, text: str) -> int:
    """Write atomically (a temporary file beside it, then a rename); return the size in bytes."""
    path = Path(path)
    if path.is_dir():
        raise CharlmError(f"-o {path} is a directory; give a file name, e.g. {path / 'viz.html'}")
    raw = text.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise CharlmError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CharlmError(f"cannot write {path}: {e.strerror or e}") from None
    return len(raw)
