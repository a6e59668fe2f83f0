#!/usr/bin/env bash
# The classic experiments at CPU scale (issue 4): one corpus, its -cpu preset, the plain reference.
#
#   bash benchmarks/classic.sh CORPUS [--reference]     # CORPUS: shakespeare, paulgraham or linux-core
#
# From the repository root with charlm installed (make test sets up .venv; activate it or set
# CHARLM/PYTHON). Steps, all logged to benchmarks/results/classic/CORPUS*:
#   1. charlm corpus get CORPUS (mirror from CHARLM_CORPUS_MIRROR, checksum verified)
#   2. charlm train CORPUS --preset CORPUS-cpu (15 minutes)            -> CORPUS/ (metrics.jsonl, checkpoints)
#   3. charlm eval on val, test and val+test (the last 10% of the text) -> CORPUS.eval.json
#   4. charlm plot                                                      -> docs/img/CORPUS-loss.png
#   5. 500 characters sampled at temperature 0.8 (seed 1) and a beam-search continuation (width 10)
#   6. with --reference: benchmarks/plain_lstm_reference.py, the same model size, dropout and
#      batch, the same 15 minutes and split                             -> CORPUS.reference.json
set -euo pipefail

CHARLM=${CHARLM:-charlm}
PYTHON=${PYTHON:-python}
corpus=${1:?usage: classic.sh CORPUS [--reference]}
reference=${2:-}
OUT=benchmarks/results/classic
mkdir -p "$OUT" docs/img
case $corpus in
    shakespeare) prime="ROMEO:"; beam_prime=$'KING HENRY:\n' ;;
    paulgraham) prime="The"; beam_prime="The best way to start a startup is" ;;
    linux-core) prime="static int"; beam_prime="static int " ;;
    *) echo "unknown corpus $corpus" >&2; exit 1 ;;
esac

"$CHARLM" corpus get "$corpus"
run=$OUT/$corpus
rm -rf "$run"
"$CHARLM" train "$corpus" --preset "$corpus-cpu" --out "$run" 2> "$run.log"
{
    echo "{"
    for split in val test val+test; do
        echo "\"$split\": $("$CHARLM" eval "$run/last.safetensors" --split "$split" --json),"
    done
    echo "\"preset\": \"$corpus-cpu\"}"
} > "$run.eval.json"
"$CHARLM" plot "$run" -o "docs/img/$corpus-loss.png"
"$CHARLM" sample "$run/last.safetensors" --length 500 --temperature 0.8 --seed 1 --prime "$prime" > "$run.sample.txt"
"$CHARLM" beam "$run/last.safetensors" --prime "$beam_prime" --length 200 --beam-width 10 --n-best 1 > "$run.beam.txt"

if [ "$reference" = "--reference" ]; then
    # the preset's model and batch, read back from the checkpoint so the two always match
    args=$("$PYTHON" - "$run/last.safetensors" <<'PY'
import sys
from charlm import checkpoint
meta = checkpoint.read_meta(sys.argv[1])
m, t = meta["model"], meta["train"]
print(f"--num-layers {m['num_layers']} --rnn-size {m['rnn_size']} --embed-size {m['embed_size']} --dropout {m['dropout']} "
      f"--batch-size {t['batch_size']} --seq-length {t['seq_length']} --time-budget {t['time_budget']}")
PY
)
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/plain_lstm_reference.py --text "corpora/$corpus/input.txt" $args > "$run.reference.json" 2> "$run.reference.log"
fi
