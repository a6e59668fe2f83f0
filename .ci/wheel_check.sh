#!/usr/bin/env bash
# Install anywhere: build a wheel of charlm, install it into a fresh venv beside the pinned CPU torch,
# and use it from an EMPTY directory, away from the checkout and with a throwaway HOME: version,
# corpus list, fetch shakespeare (from the local mirror when there is one), train the demo preset a
# few steps, sample. About a minute when torch comes from a local wheel cache.
#
#   .ci/wheel_check.sh                 # or: make wheel-check
#   MIRROR=DIR PYTHON=python3.12 TORCH_SPEC=torch==2.13.0 .ci/wheel_check.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_PIP_ARGS="${TORCH_PIP_ARGS:-}"
MIRROR="${MIRROR:-$ROOT/../shared/corpora}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/charlm-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

step() { printf '== wheel check [%3ds]: %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { printf 'wheel check: FAILED: %s\n' "$*" >&2; exit 1; }
# pip's chatter (index warnings) goes to a log, shown only when the command fails.
quiet() { "$@" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; die "$*"; }; }

# Build from a copy of the sources, so the checkout gets no build/ or egg-info, and so only what
# pyproject.toml declares (package data included) can reach the wheel.
step "build the wheel (from a copy of pyproject.toml, README.md, charlm/)"
mkdir -p "$WORK/src"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/src/"
cp -r "$ROOT/charlm" "$WORK/src/charlm"
find "$WORK/src" -name __pycache__ -type d -prune -exec rm -rf {} +
# --no-build-isolation: setuptools comes from the project venv (no network for the build).
BUILD_PIP="$ROOT/.venv/bin/pip"
[ -x "$BUILD_PIP" ] || BUILD_PIP="$PYTHON -m pip"
quiet $BUILD_PIP wheel --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/charlm-*.whl)"
step "built $(basename "$WHEEL")"
"$PYTHON" -c "import sys, zipfile; sys.exit('charlm/data/corpora/shakespeare.yaml' not in zipfile.ZipFile(sys.argv[1]).namelist())" "$WHEEL" \
  || die "the wheel has no charlm/data/corpora/shakespeare.yaml"  # python, not unzip: a fresh machine may lack it

step "fresh venv: $TORCH_SPEC first, then the wheel (its other dependencies from the index)"
quiet "$PYTHON" -m venv "$WORK/venv"
VPIP="$WORK/venv/bin/pip"
# --no-compile: byte-compiling all of torch takes longer (~40 s here) than compiling, once, what
# charlm imports (the runs below may write bytecode caches into the throwaway venv).
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip arguments
quiet "$VPIP" install --no-compile --disable-pip-version-check $TORCH_PIP_ARGS "$TORCH_SPEC"
step "torch installed; now the wheel"
quiet "$VPIP" install --no-compile --disable-pip-version-check "$WHEEL"
CHARLM="$WORK/venv/bin/charlm"

# An empty directory, outside any checkout, and a throwaway HOME: nothing real is read or written.
mkdir -p "$WORK/empty" "$WORK/home"
cd "$WORK/empty"
unset CHARLM_CORPORA_DIR CHARLM_CORPUS_MIRROR PYTHONDONTWRITEBYTECODE
export HOME="$WORK/home" XDG_DATA_HOME="$WORK/home/.local/share"
DATA="$XDG_DATA_HOME/charlm/corpora"

step "charlm --version"
"$CHARLM" --version | tee "$WORK/version.txt"
grep -q "^charlm [0-9]" "$WORK/version.txt" || die "--version printed no 'charlm X.Y.Z'"

step "charlm corpus list"
"$CHARLM" corpus list >"$WORK/list.txt" 2>"$WORK/list.err"
cat "$WORK/list.err" >&2
for name in shakespeare paulgraham linux-core linux; do
    grep -q "$name" "$WORK/list.txt" || die "corpus list does not show $name"
done
grep -q "$DATA" "$WORK/list.err" || die "corpus list does not name the per-user corpora dir $DATA"

if [ -f "$MIRROR/shakespeare/input.txt" ]; then
    step "charlm corpus get shakespeare --mirror $MIRROR"
    "$CHARLM" corpus get shakespeare --mirror "$MIRROR"
else
    step "charlm corpus get shakespeare (no mirror at $MIRROR: from its URL)"
    "$CHARLM" corpus get shakespeare
fi
[ -f "$DATA/shakespeare/input.txt" ] || die "shakespeare is not at $DATA/shakespeare/input.txt"

step "charlm train shakespeare --preset demo --max-steps 5"
"$CHARLM" train shakespeare --preset demo --max-steps 5 --eval-every 5 --time-budget 60 --out run
[ -f run/best.safetensors ] || die "training wrote no run/best.safetensors"
[ -d "$DATA/.cache" ] || die "the prepare cache is not under $DATA/.cache"

step "charlm sample run/best.safetensors --length 50 --seed 1"
"$CHARLM" sample run/best.safetensors --length 50 --seed 1 | tee "$WORK/sample.txt"
[ -s "$WORK/sample.txt" ] || die "sample printed nothing"

left="$(ls -A "$WORK/empty")"
[ "$left" = "run" ] || die "the working directory holds more than run/: $left"
echo "wheel check: passed in $((SECONDS - START)) s ($(basename "$WHEEL"))"
