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
from charlm.terminal import shown


def render(data: dict, title: str) -> str:
    """The page's HTML for the data `report.build` made."""
    template = resources.files("charlm.viz").joinpath("page.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write(path: Path, text: str) -> int:
    """Write atomically (a temporary file beside it, then a rename); return the size in bytes.

    The page gets the mode a new file of this user gets (0666 less the umask), as any file the
    user writes: it holds the text it was made from, which may be private (umask 077)."""
    path = Path(path)
    if path.is_dir():
        raise CharlmError(f"-o {shown(path)} is a directory; give a file name, e.g. {shown(path / 'viz.html')}")
    raw = text.encode("utf-8", "backslashreplace")  # a file name (in the page's title) that is not UTF-8, escaped
    name = path.name if len(os.fsencode(path.name)) <= 200 else "viz"  # room for the temp file's suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise CharlmError(f"cannot write {shown(path)}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CharlmError(f"cannot write {shown(path)}: {e.strerror or e}") from None
    return len(raw)


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
