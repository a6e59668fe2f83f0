#!/usr/bin/env bash
# The first minutes on a GPU, prepared: one script, at most 8 minutes on an H100, every figure in one file.
#
#   bash benchmarks/gpu_check.sh [--out DIR]             # on a CUDA machine (docs/gpu.md says how to run it there)
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]   # the same steps on the CPU at tiny sizes, under 2 minutes (CI)
#
# Steps: 1. the machine; 2. the device tests (tests/test_device.py with CHARLM_TEST_DEVICE=cuda);
# 3. the GPU presets' training speed in fp32 and bf16 (a fixed number of steps); 4. sampling 1 and
# 64 streams in fp32 and bf16 from those models; 5. the parallel (log) scan against the sequential
# one for minGRU and minLSTM, forward and backward; 6. one-stream CPU sampling at 1..N threads (the
# thread policy's data, charlm/threads.py); 7. paulgraham-gpu trained for a while, then
# `charlm viz --find quote` on its text; 8. that CUDA-written checkpoint sampled on the CPU.
# Figures go to DIR/gpu_check.txt (default benchmarks/results/gpu_check; with the device tool: --out $OUT).
#
# Corpora: shakespeare and paulgraham, by name: from $CHARLM_CORPUS_MIRROR (default ../shared/corpora
# when it exists, as the Makefile does) or already fetched into corpora/ (carry corpora/shakespeare and
# corpora/paulgraham to a machine that has no mirror). Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

DRY=0
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's charlm, installed or not
export PYTHONUNBUFFERED=1
if [ -z "${CHARLM_CORPUS_MIRROR:-}" ] && [ -d ../shared/corpora ]; then
  export CHARLM_CORPUS_MIRROR="$(cd ../shared/corpora && pwd)"
fi
OUT_DIR="${OUT_DIR:-benchmarks/results/gpu_check$( [ $DRY = 1 ] && echo -dry )}"
mkdir -p "$OUT_DIR"
FIG="$OUT_DIR/gpu_check.txt"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/charlm-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export CHARLM_CORPORA_DIR="${CHARLM_CORPORA_DIR:-$ROOT/corpora}"
START=$(date +%s)

if [ $DRY = 1 ]; then
  DEVICE=cpu
  PRESETS="shakespeare-gpu paulgraham-gpu"
  SMALL=(--num-layers 1 --rnn-size 32 --embed-size 16 --batch-size 8 --seq-length 32)  # tiny sizes over each preset
  STEPS=6; LOG_EVERY=2; SAMPLE_LEN=40; PG_BUDGET=4s; VIZ_CHARS=1500
else
  DEVICE=cuda
  PRESETS="shakespeare-gpu paulgraham-gpu linux-gpu"
  SMALL=()
  STEPS=60; LOG_EVERY=10; SAMPLE_LEN=1000; PG_BUDGET=120s; VIZ_CHARS=20000
fi

say() { echo "$*" | tee -a "$FIG"; }
step() { say ""; say "## $* (at $(( $(date +%s) - START )) s)"; }
charlm() { "$PYTHON" -m charlm "$@"; }

: > "$FIG"
say "# benchmarks/gpu_check.sh $( [ $DRY = 1 ] && echo '--dry-run (CPU, tiny sizes: checks the script, not the GPU)' ), $(date -u +%Y-%m-%dT%H:%M:%SZ)"

step "1. the machine"
"$PYTHON" - <<'EOF' | tee -a "$FIG"
import torch
from charlm import machine
print(machine.describe())
if torch.cuda.is_available():
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
EOF
if [ $DRY = 0 ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'this torch sees no CUDA device: run --dry-run, or use a CUDA build of torch')"
  (nvidia-smi -L 2>/dev/null || true) | tee -a "$FIG"
fi
# Both presets' corpora, before anything is timed (fetched from the mirror once, checksummed).
SHAKESPEARE="$("$PYTHON" -c 'from charlm.data import corpus; print(corpus.get("shakespeare"))')"
PAULGRAHAM="$("$PYTHON" -c 'from charlm.data import corpus; print(corpus.get("paulgraham"))')"
DTYPES="fp32 $("$PYTHON" -c "
import torch
from charlm.devices import cpu_has_bf16, gpu_has_bf16
d = torch.device('$DEVICE')
print('bf16' if (gpu_has_bf16(d) if d.type == 'cuda' else cpu_has_bf16()) else '')")"
say "dtypes timed: $DTYPES"

step "2. the device tests (tests/test_device.py, CHARLM_TEST_DEVICE=$DEVICE)"
CHARLM_TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -3 | tee -a "$FIG"

step "3. training speed: the GPU presets, $STEPS steps, the trainer's own chars/s (first interval dropped)"
for preset in $PRESETS; do
  case $preset in shakespeare-gpu) corpus=shakespeare ;; *) corpus=paulgraham ;; esac  # linux-gpu's speed, on paulgraham's text
  for dtype in $DTYPES; do
    run="$WORK/train-$preset-$dtype"
    charlm train "$corpus" --preset "$preset" "${SMALL[@]}" --device "$DEVICE" --dtype "$dtype" --max-steps "$STEPS" \
      --log-every "$LOG_EVERY" --eval-every 1000000 --out "$run" --overwrite > "$run.log" 2>&1 || { tail -20 "$run.log"; exit 1; }
    "$PYTHON" - "$run/metrics.jsonl" "$preset" "$dtype" <<'EOF' | tee -a "$FIG"
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["chars_per_s"] for r in records if r["kind"] == "train"]
print(f"train {sys.argv[2]:<16} {sys.argv[3]:<5} {statistics.median(rates[1:] or rates):>12,.0f} chars/s  ({len(rates)} intervals)")
EOF
  done
done

step "4. sampling, 1 and 64 streams, from the fp32-trained models (median of 3, after a warm-up)"
"$PYTHON" - "$WORK" "$DEVICE" "$SAMPLE_LEN" "$DTYPES" $PRESETS <<'EOF' | tee -a "$FIG"
import statistics, sys, time
import torch
from charlm import checkpoint
from charlm.decoding.sampling import processors, sample
from charlm.decoding.scorer import ModelScorer
work, device, length, dtypes, presets = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]

def timed(fn):
    fn()
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

for preset in presets:
    ckpt = checkpoint.load(f"{work}/train-{preset}-fp32/last.safetensors")
    for dtype in dtypes:
        scorer = ModelScorer(ckpt.build_model().to(device), ckpt.vocab, dtype=dtype)
        prime = torch.as_tensor(ckpt.vocab.encode("The "))
        for streams, n in ((1, length), (64, max(length // 4, 10))):
            t = timed(lambda: sample(scorer, prime, n, processors(0.8), generator=torch.Generator().manual_seed(0), num_samples=streams))
            print(f"sample {preset:<16} {dtype:<5} {streams:>2} stream{'s' if streams > 1 else ' '} {streams * n / t:>12,.0f} chars/s  ({1e3 * t / n:.3f} ms per step)")
EOF

step "5. the scans: minGRU / minLSTM 2x512, batch 64 x 256 (dry run: tiny), forward + backward, log (parallel) vs sequential"
"$PYTHON" - "$DEVICE" "$DRY" <<'EOF' | tee -a "$FIG"
import statistics, sys, time
import torch
from charlm.cells import cell_class
device, dry = torch.device(sys.argv[1]), sys.argv[2] == "1"
batch, seq, width = (4, 32, 32) if dry else (64, 256, 512)
for name in ("mingru", "minlstm"):
    times = {}
    for scan in ("sequential", "log"):
        torch.manual_seed(0)
        cell = cell_class(name)(64, width, 2, 0.0).to(device)
        cell.scan = scan
        x = torch.randn(batch, seq, 64, device=device, requires_grad=True)
        state = cell.zero_state(batch, device=device)

        def once():
            out, _ = cell(x, state)
            out.float().sum().backward()

        once()
        rounds = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            once()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rounds.append(time.perf_counter() - start)
        times[scan] = statistics.median(rounds)
    print(f"scan {name:<8} sequential {1e3 * times['sequential']:8.2f} ms  log {1e3 * times['log']:8.2f} ms  "
          f"log is {times['sequential'] / times['log']:.2f}x sequential's speed")
EOF

step "6. one-stream sampling on the CPU at 1..N threads (2x512 LSTM at random init (dry run: tiny), fp32; charlm/threads.py's data)"
"$PYTHON" - "$DRY" <<'EOF' | tee -a "$FIG"
import statistics, sys, time
import torch
from charlm import threads
from charlm.decoding.sampling import processors, sample
from charlm.tools.bench import random_scorer
dry = sys.argv[1] == "1"
scorer = random_scorer(1, 64, 0) if dry else random_scorer(2, 512, 0)
prime, n = torch.as_tensor(scorer.vocab.encode("The ")), 50 if dry else 500
counts = [c for c in (1, 2, 4, 8, 16, 32) if c <= threads.physical_cores()]
print(f"{threads.physical_cores()} physical cores, {threads.free_cores():.1f} free")
for c in counts:
    torch.set_num_threads(c)
    run = lambda: sample(scorer, prime, n, processors(0.8), generator=torch.Generator().manual_seed(0))
    run()
    t = statistics.median([(lambda s: (run(), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(3)])
    print(f"cpu sample 1 stream, {c:>2} threads {n / t:>10,.0f} chars/s")
EOF

step "7. paulgraham-gpu for $PG_BUDGET, then viz --find quote on the last $VIZ_CHARS characters of its text"
PG="$WORK/pg"
charlm train paulgraham --preset paulgraham-gpu "${SMALL[@]}" --device "$DEVICE" --time-budget "$PG_BUDGET" --eval-every 500 \
  --log-every 50 --out "$PG" --overwrite > "$PG.log" 2>&1 || { tail -20 "$PG.log"; exit 1; }
grep -E "^done" "$PG.log" | tee -a "$FIG" || tail -3 "$PG.log" | tee -a "$FIG"
tail -c "$VIZ_CHARS" "$PAULGRAHAM" > "$WORK/pg-tail.txt"
charlm viz "$PG/best.safetensors" --text "$WORK/pg-tail.txt" --find quote --top 3 --device "$DEVICE" --json \
  --out "$WORK/pg.viz.html" --unknown skip 2> "$WORK/viz.err" > "$WORK/viz.json" || { cat "$WORK/viz.err"; exit 1; }
"$PYTHON" - "$WORK/viz.json" <<'EOF' | tee -a "$FIG"
import json, sys
found = json.load(open(sys.argv[1]))["find"]["quote"]
tops = ", ".join(f"layer {r['layer']} cell {r['cell']} r={r['r']:+.3f}" for r in found["top"])
print(f"viz --find quote ({found['method']}): {tops or 'nothing to rank'}")
EOF

step "8. the CUDA-written checkpoint sampled on the CPU"
charlm sample "$PG/best.safetensors" --device cpu --length 200 --seed 1 --prime "The " > "$WORK/cpu-sample.txt" 2> "$WORK/cpu-sample.err" \
  || { cat "$WORK/cpu-sample.err"; exit 1; }
"$PYTHON" - "$WORK/cpu-sample.txt" "$PG/best.safetensors" <<'EOF' | tee -a "$FIG"
import sys
from charlm import checkpoint
text = open(sys.argv[1], encoding="utf-8").read()
device = checkpoint.load(sys.argv[2]).meta["provenance"]["device"]
assert text.startswith("The ") and len(text) >= 200, text
print(f"written on {device}, sampled on cpu: {len(text.rstrip(chr(10))) - 4} characters after the prime: {text[4:64]!r}...")
EOF

say ""
say "total: $(( $(date +%s) - START )) s; figures in $FIG"
