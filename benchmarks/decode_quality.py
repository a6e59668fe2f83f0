"""What the decoding dtypes cost in accuracy: bits/char scored step by step, as sampling computes it.

    python benchmarks/decode_quality.py CKPT [CKPT ...] [--chars 20000] [--split test]

`charlm eval` scores whole windows (the oneDNN sequence kernel); sampling and beam search run the
single-step cells (charlm/cells.py), whose products are fp32, bf16 or int8. This feeds the first
--chars characters of a split through those cells one character at a time (teacher forcing) and
reports bits/char for each dtype, for each checkpoint and, with several, their ensemble (mean of
probabilities). The difference from fp32 is what a dtype changes in the distribution sampled from.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from charlm import checkpoint
from charlm.config import DECODE_DTYPES
from charlm.data import PreparedData
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.scorer import ModelScorer


@torch.inference_mode()
def stepwise_bits_per_char(scorer, ids: torch.Tensor) -> tuple[float, float]:
    """(bits/char of ids[1:] given the preceding ones, chars/s), one step per character."""
    state = scorer.start(1)
    nll = 0.0
    start = time.perf_counter()
    for t in range(len(ids) - 1):
        logp, state = scorer.step(ids[t : t + 1], state)
        nll -= float(logp[0, ids[t + 1]])
    return nll / math.log(2) / (len(ids) - 1), (len(ids) - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--chars", type=int, default=20_000)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    ckpts = [checkpoint.load(p) for p in args.checkpoints]
    data = PreparedData(checkpoint.read_meta(args.checkpoints[0])["provenance"]["data_dir"])
    ids = torch.from_numpy(data.tokens(args.split)[: args.chars].astype("int64"))
    print(f"{args.split} split, first {len(ids):,} characters, scored one step at a time; {torch.get_num_threads()} threads")
    print(f"{'model':<28} " + " ".join(f"{d + ' bits/char':>15} {'chars/s':>8}" for d in DECODE_DTYPES))
    names = [f"{Path(p).parent.name}/{Path(p).name}" for p in args.checkpoints] + (["ensemble (mean)"] if len(ckpts) > 1 else [])
    for k, name in enumerate(names):
        cells = []
        for dtype in DECODE_DTYPES:
            members = [ModelScorer(c.build_model(), c.vocab, dtype=dtype) for c in ckpts]
            scorer = members[k] if k < len(ckpts) else Ensemble(members)
            bpc, speed = stepwise_bits_per_char(scorer, ids)
            cells.append(f"{bpc:>15.4f} {speed:>8,.0f}")
        print(f"{name[-28:]:<28} " + " ".join(cells))


if __name__ == "__main__":
    main()
