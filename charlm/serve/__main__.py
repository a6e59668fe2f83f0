"""`python -m charlm.serve CKPT... [options]`: the same as `charlm serve CKPT... [options]`."""

from __future__ import annotations

import sys

import charlm.cli.serve  # noqa: F401  (registers the serve command on the app)
from charlm.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
