"""Every Python code block of the README's Python section and of docs/api.md runs, in order, against tiny
models at the paths the examples name (made here in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_text, train_small

from charlm.data import PreparedData
from charlm.data import prepare as prep

ROOT = Path(__file__).resolve().parent.parent
LINES = [
    "ROMEO:",
    "But, soft! what light through yonder window breaks?",
    "JULIET:",
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def readme_python_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Python")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """input.txt and checkpoints/shk (LSTM, best and last) and checkpoints/shk-gru (GRU) trained on it, a few steps each."""
    d = tmp_path_factory.mktemp("docs")
    text = "".join(f"{LINES[i % len(LINES)]}\n{line}" for i, line in enumerate(make_text(30000).splitlines(keepends=True)))
    (d / "input.txt").write_text(text)
    prep.prepare([d / "input.txt"], d / "prepared")
    data = PreparedData(d / "prepared")
    train_small(data, d / "checkpoints" / "shk", max_steps=20)
    train_small(data, d / "checkpoints" / "shk-gru", cell="gru", max_steps=20)
    return d


@pytest.mark.parametrize("source", ["README.md", "docs/api.md"])
def test_code_blocks_run(source, workdir, monkeypatch, capsys):
    markdown = readme_python_section() if source == "README.md" else (ROOT / source).read_text()
    blocks = python_blocks(markdown)
    assert blocks, f"no python blocks in {source}"
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{source} block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block, so a failing example is found at once
            raise AssertionError(f"{source}, python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    assert capsys.readouterr().out  # the examples print what they show
