"""Writes the compatibility checkpoints with the code of the commit they are committed at (5d3e997).

One tiny checkpoint per cell type, and the log-probs each gives a fixed text, so that later code
(new cell modules, a new checkpoint version) can be checked to load and score them the same.
Run once: `python tests/data/compat/make_compat.py`; the files are committed, not regenerated.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ for conftest.make_text

from conftest import make_text  # noqa: E402

from charlm.config import ModelConfig, TrainConfig  # noqa: E402
from charlm.data import PreparedData  # noqa: E402
from charlm.data import prepare as prep  # noqa: E402
from charlm.decoding.scorer import ModelScorer  # noqa: E402
from charlm.training.trainer import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = "The quick brown fox jumps over a lazy dog.\nSeven wizards quietly hex the fox.\n"


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny.txt"
        src.write_text(make_text(6000))
        prep.prepare([src], Path(tmp) / "p")
        data = PreparedData(Path(tmp) / "p")
        expected = {"text": TEXT}
        for cell in ("lstm", "gru", "rnn"):
            model = ModelConfig(cell=cell, num_layers=2, rnn_size=12, embed_size=8)
            train = TrainConfig(batch_size=4, seq_length=16, max_steps=8, eval_every=8, log_every=8, device="cpu", seed=0)
            out = Path(tmp) / cell
            Trainer(model, train, data, out).run()
            target = HERE / f"{cell}.safetensors"
            target.write_bytes((out / "last.safetensors").read_bytes())
            from charlm import checkpoint

            ckpt = checkpoint.load(target)
            scorer = ModelScorer(ckpt.build_model(), ckpt.vocab)
            ids = torch.from_numpy(ckpt.vocab.encode(TEXT)).view(1, -1)
            logp, _ = scorer.score(ids, scorer.start(1))  # (1, T, V)
            expected[cell] = logp[0, :-1].gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()
    (HERE / "expected.json").write_text(json.dumps(expected, indent=0))


if __name__ == "__main__":
    main()
