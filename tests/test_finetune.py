"""Fine-tuning on new text: vocabularies that grow (old ids kept, new symbols appended)."""

from __future__ import annotations

import numpy as np

from charlm.tokenizers.vocab import Vocab


def test_extended_vocabulary_keeps_old_ids_and_appends_new_symbols():
    old = Vocab.from_text("the cat\n")
    grown = old.extended(ord(c) for c in "the {cat} Æ\n")
    assert grown.decode(range(len(old))) == old.decode(range(len(old)))  # every old id names the same symbol
    assert grown.decode(range(len(old), len(grown))) == "{}Æ"  # the new ones follow, in code-point order
    text = "the {cat} Æ\n"
    assert grown.decode(grown.encode(text)) == text
    assert np.array_equal(grown.encode("the cat\n"), old.encode("the cat\n"))
    again = Vocab.from_meta(grown.to_meta())
    assert again == grown and np.array_equal(again.encode(text), grown.encode(text))
    assert list(grown.lookup([ord("{"), ord("t"), ord("Z")])) == [len(old), int(old.encode("t")[0]), -1]
    assert old.extended(ord(c) for c in "cat") is old
