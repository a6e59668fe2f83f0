#!/usr/bin/env bash
# Tokenizers: char vs BPE on tiny Shakespeare, at the same 10-minute CPU budget each.
#
#   bash benchmarks/tokenizer_compare.sh        # from the repository root, charlm installed (make test sets it up)
#
# Four training runs of 10 minutes (about 42 minutes in all on a 2-core CPU), each followed by an
# evaluation on the test split (the last 5% of the file), which is always reported in bits per
# character of the raw text (and, for BPE, bits per token beside it). Everything lands in
# benchmarks/results/tokenizers/: per run the run dir (checkpoints, metrics.jsonl), the training
# log (NAME.log) and the evaluation (NAME.test.json); at the end, table.md for docs/results.md.
# The preset's dropout and model are kept for every tokenizer: only the unit changes.
set -euo pipefail

CHARLM=${CHARLM:-charlm}
PYTHON=${PYTHON:-python}
TEXT=corpora/shakespeare/input.txt
OUT=benchmarks/results/tokenizers
mkdir -p "$OUT"
[ -f "$TEXT" ] || "$CHARLM" corpus get shakespeare

run() {  # NAME, then the tokenizer options
    local name=$1
    shift
    echo "== $name: $* (10 minutes)" >&2
    rm -rf "${OUT:?}/$name"
    "$CHARLM" train "$TEXT" --preset shakespeare-cpu --time-budget 10m --out "$OUT/$name" "$@" 2> "$OUT/$name.log"
    "$CHARLM" eval "$OUT/$name/last.safetensors" --split test --json > "$OUT/$name.test.json"
}

run char    --tokenizer char
run bpe256  --tokenizer bpe --vocab-size 256
run bpe512  --tokenizer bpe --vocab-size 512
run bpe1024 --tokenizer bpe --vocab-size 1024

# The table: test bits/char (and bits/token), training speed in characters of text per second
# (median of the progress reports, the first one dropped as warm-up), steps done in the budget.
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, statistics, sys
from pathlib import Path

from charlm import checkpoint

out = Path(sys.argv[1])
print("| tokenizer | output layer | steps in 10 min | chars/s (train) | test bits/char | test bits/token | test tokens / chars |")
print("|---|---|---|---|---|---|---|")
for name, label in [("char", "char"), ("bpe256", "bpe, --vocab-size 256"), ("bpe512", "bpe, --vocab-size 512"),
                    ("bpe1024", "bpe, --vocab-size 1024")]:
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    speed = statistics.median(r["chars_per_s"] for r in train[1:] or train)
    test = json.loads((out / f"{name}.test.json").read_text())
    meta = checkpoint.load(out / name / "last.safetensors").meta
    per_token = test.get("bits_per_token", test["bits_per_char"])
    print(f"| {label} | {meta['model']['vocab_size']} | {train[-1]['step']:,} | {speed:,.0f} | {test['bits_per_char']:.4f} "
          f"| {per_token:.4f} | {test['tokens']:,} / {test['chars']:,} |")
EOF
