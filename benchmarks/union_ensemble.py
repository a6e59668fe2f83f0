"""A union-vocabulary ensemble on a text that mixes two corpora: a Shakespeare model and a Paul Graham model,
scored on paragraphs taken in turn from each corpus's test split.

    python benchmarks/union_ensemble.py SHAKESPEARE.safetensors PAULGRAHAM.safetensors [--chars 60000]

The members' vocabularies differ (each lacks some of the other's characters), so the ensemble runs
over their union (charlm/decoding/union.py). A member alone cannot score a character it never saw:
its figure is on the text less those characters (unknown="skip"), a lower bound of its cost on the
whole text; the ensemble's is on every character.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import charlm
from charlm.data import PreparedData


def test_text(lm: charlm.LanguageModel) -> str:
    data = PreparedData(lm.info[0]["provenance"]["data_dir"])
    return data.vocab.decode(data.tokens("test").tolist())


def paragraphs(text: str, size: int) -> list[str]:
    """Cut at line ends into pieces of about `size` characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shakespeare")
    ap.add_argument("paulgraham")
    ap.add_argument("--chars", type=int, default=60000, help="length of the mixed text")
    ap.add_argument("--paragraph", type=int, default=400, help="characters per piece, about")
    args = ap.parse_args()
    a, b = (charlm.load(p, device="cpu", dtype="fp32") for p in (args.shakespeare, args.paulgraham))
    pa, pb = paragraphs(test_text(a), args.paragraph), paragraphs(test_text(b), args.paragraph)
    mixed = "".join(x + y for x, y in zip(pa, pb))[: args.chars]
    ens = charlm.load(args.shakespeare, args.paulgraham, device="cpu", dtype="fp32")
    start = time.perf_counter()
    whole = ens.score(mixed)
    print(
        f"mixed text: {len(mixed):,} characters, alternating ~{args.paragraph}-character pieces of each test split; "
        f"union vocabulary {len(ens.vocab)} ({len(a.vocab)} + {len(b.vocab)} symbols); {time.perf_counter() - start:.0f} s"
    )
    print("| model | bits/char | characters scored |")
    print("|---|---|---|")
    for name, lm in ((Path(args.shakespeare).parent.name, a), (Path(args.paulgraham).parent.name, b)):
        alone = lm.score(mixed, unknown="skip")
        print(f"| {name} alone (its unknown characters left out) | {alone.bits_per_char:.4f} | {alone.chars:,} |")
    print(f"| union ensemble (mean) | {whole.bits_per_char:.4f} | {whole.chars:,} |")


if __name__ == "__main__":
    main()
