"""A whole decoding step of a few rows (one stream, a small beam) in one call to a small C library.

For a single stream a step reads every weight once and does little else; what PyTorch adds around
that reading (an operator dispatch per matrix product, gate activation and copy, each a few
microseconds) was half of the step (docs/performance.md). Here one C function runs the step of M
models for B <= MAX_ROWS rows: per layer the gate products and the cell's pointwise equations, then
the head and, for a Scorer, the log-softmax. The products read weights packed once per model in 64-row
groups, in the decoding dtype:

- fp32: plain fp32 dot products (AVX-512 FMA where the CPU has it);
- bf16: weights and activations in bf16, sums in fp32 (AVX-512 BF16's dot product where present);
- int8: weights as int8 with one scale per row (as products.Int8Product); the activations as 16-bit
  integers with one scale per row, split into a high and a low byte, so both halves go through
  exact u8 x s8 integer sums (AVX-512 VNNI) and the result is as exact as fp32 activations would give.

The fp32 sums run in another order than oneDNN's, so log-probs agree with the PyTorch path to ~1e-6,
not bit for bit (tests/test_one_stream.py holds them to the cells' equations at 1e-5).

The C source (native_step.c) is compiled on first use with the system's C compiler for this CPU
(-march=native) and cached under the user cache directory, keyed by the source, the compiler and the
CPU's feature flags. Without a compiler (or with CHARLM_NATIVE=0) nothing changes but the speed:
every step runs on PyTorch's kernels, and a warning says so once per process. Threads: OpenMP from the
same runtime torch uses (libgomp), at torch's current thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

# The C source ships beside this module (package data). VERSION changes with any change of the
# functions' signatures or structs: a cached library of another version is rebuilt, never loaded.
# Layout of a packed matrix (rows, cols): groups of 64 rows; the input padded to kpad (a multiple of
# 4); fp32 [group][k][64], bf16 [group][k/2][64][2], int8 [group][k/4][64][4] plus a scale and the sum
# of the int8 weights per row. Each group is one contiguous stream of weights, read once per step.
VERSION = 2
SOURCE = resources.files("charlm.cells").joinpath("native_step.c").read_text(encoding="utf-8")

MAX_ROWS = 16  # rows (streams, beam hypotheses) a native step takes; more go through PyTorch's batched kernels
ENV_VAR = "CHARLM_NATIVE"  # 0 / off: never build or use the library
KINDS = {"fp32": 0, "bf16": 1, "int8": 2}
CELLS = {"lstm": 0, "peephole": 1, "gru": 2, "rnn": 3, "mingru": 4, "minlstm": 5}
GROUP = 64  # rows per packed group (four AVX-512 vectors of 16 fp32 sums)

log = logging.getLogger("charlm.native")


class _Mat(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("rows", ctypes.c_int32),
        ("cols", ctypes.c_int32),
        ("kpad", ctypes.c_int32),
        ("ngroups", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("rowsum", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("cell", ctypes.c_int32),
        ("layers", ctypes.c_int32),
        ("H", ctypes.c_int32),
        ("V", ctypes.c_int32),
        ("G", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("table0", ctypes.c_void_p),
        ("rec", ctypes.POINTER(_Mat)),
        ("inp", ctypes.POINTER(_Mat)),
        ("bias", ctypes.POINTER(ctypes.c_void_p)),
        ("bias_h", ctypes.POINTER(ctypes.c_void_p)),
        ("peep", ctypes.POINTER(ctypes.c_void_p)),
        ("head", _Mat),
        ("head_b", ctypes.c_void_p),
    ]


# -- building and loading the library -----------------------------------------------------------
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None


def disabled() -> bool:
    """Whether the user turned the native step off ($CHARLM_NATIVE=0)."""
    value = os.environ.get(ENV_VAR)
    return value is not None and value.strip().lower() in ("0", "off", "false", "no")


def library() -> ctypes.CDLL | None:
    """The compiled step library, built on first use; None (and a warning, once) where it cannot be."""
    global _lib, _tried, _why_not
    if _tried and _lib is None or disabled():
        return None
    if _lib is not None:
        return _lib
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _bind(ctypes.CDLL(str(_build())))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _why_not = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning(
                    "charlm: the native decoding step is not available (%s); single steps run on PyTorch's "
                    "kernels, correct but slower",
                    _why_not,
                )
        return _lib


def why_not() -> str | None:
    """Why library() gave None (after it was called), for `charlm env` and the benchmarks."""
    return "turned off ($CHARLM_NATIVE=0)" if disabled() else _why_not


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (a cache shared by two machines
    must not hand one the other's binary)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("charlm"))
    except ImportError:
        base = Path.home() / ".cache" / "charlm"
    return base / "native"


FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])  # the first that compiles


def _build() -> Path:
    named = shlex.split(os.environ.get("CC", ""))  # $CC may be "ccache gcc"
    compiler = named or [c for c in (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),) if c]
    if not compiler:
        raise RuntimeError("no C compiler found (cc, gcc or clang)")
    key = hashlib.sha256("\n".join([SOURCE, *compiler, _cpu_key(), platform.platform()]).encode()).hexdigest()[:20]
    target = _cache_dir() / f"charlm_step_{VERSION}_{key}.so"  # the user's own directory: never a shared /tmp
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return _compile(compiler, target)


def _compile(compiler: list[str], target: Path) -> Path:
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "charlm_step.c"
        src.write_text(SOURCE, encoding="utf-8")
        for flags in FLAG_SETS:
            out = Path(tmp) / "charlm_step.so"
            cmd = [*compiler, *flags, "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off", "-o", str(out), str(src), "-lm"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if run.returncode == 0:
                os.replace(out, target)  # atomic: a process beside this one sees the whole file or none
                return target
            errors.append(run.stderr.strip().splitlines()[-1:] or ["?"])
    raise RuntimeError(f"the C compiler failed: {errors[0][0]}")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if lib.cl_version() != VERSION:
        raise RuntimeError("a stale native library")
    p, i, f, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_double
    lib.cl_step.argtypes = [p, i, p, i, p, p, p, p, p, i, p, i]
    lib.cl_step.restype = i
    lib.cl_scratch_bytes.argtypes = [p, i, i]
    lib.cl_scratch_bytes.restype = ctypes.c_size_t
    lib.cl_matvec.argtypes = [p, i, p, i, i, p, i, i, p, i, p, i, p, i]
    lib.cl_matvec.restype = None
    lib.cl_draw.argtypes = [p, i, f, d]
    lib.cl_draw.restype = i
    lib.cl_log_softmax.argtypes = [p, i, i, p]
    lib.cl_log_softmax.restype = None
    lib.cl_dyn_update.argtypes = [p, p, p, p, p, f, f, ctypes.c_int64]
    lib.cl_dyn_update.restype = None
    return lib


# -- packed matrices ----------------------------------------------------------------------------
@dataclass
class Packed:
    """A matrix (rows, cols) in the library's layout: 64-row groups, the input padded to a multiple of 4,
    fp32 as [group][k][64], bf16 as [group][k/2][64][2], int8 as [group][k/4][64][4] with per-row scales."""

    mat: _Mat
    keep: list[Tensor] = field(default_factory=list)  # the tensors the struct points into

    @property
    def nbytes(self) -> int:
        return self.keep[0].numel() * self.keep[0].element_size()


def int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) -> int8 weights and one fp32 scale per row (max |w| of the row / 127), as products.Int8Product."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def pack(w: Tensor, dtype: str) -> Packed:
    """Pack a weight matrix (out, in) for the library in a decoding dtype (fp32, bf16, int8)."""
    w = w.detach().float().cpu()
    rows, cols = w.shape
    kpad, groups = -(-cols // 4) * 4, -(-rows // GROUP)
    padded = torch.zeros(groups * GROUP, kpad)
    padded[:rows, :cols] = w
    scale = rowsum = None
    if dtype == "fp32":
        data = padded.view(groups, GROUP, kpad).permute(0, 2, 1).contiguous()
    elif dtype == "bf16":
        data = padded.to(torch.bfloat16).view(groups, GROUP, kpad // 2, 2).permute(0, 2, 1, 3).contiguous()
    elif dtype == "int8":
        q, scale = int8_rows(padded)
        rowsum = q.to(torch.int32).sum(dim=1, dtype=torch.int32).contiguous()
        scale = scale.contiguous()
        data = q.view(groups, GROUP, kpad // 4, 4).permute(0, 2, 1, 3).contiguous()
    else:
        raise ValueError(f"no native product for dtype {dtype!r}")
    keep = [t for t in (data, scale, rowsum) if t is not None]
    mat = _Mat(
        KINDS[dtype],
        rows,
        cols,
        kpad,
        groups,
        0,
        data.data_ptr(),
        scale.data_ptr() if scale is not None else None,
        rowsum.data_ptr() if rowsum is not None else None,
    )
    return Packed(mat, keep)


# -- a model's step -----------------------------------------------------------------------------
@dataclass
class NativeSpec:
    """What a cell gives the library for one model (cells/NAME.py, `native_spec`), all fp32 tensors:

    table0 (V, G*H): layer 0's input product plus its biases, per id; rec[k]: the recurrent matrix
    (lstm, peephole, rnn: layer 0 only, [W_ih W_hh] above it in inp; gru: every layer); inp[k] (k >= 1):
    the input side; bias[k] (k >= 1): its bias; bias_h[k]: gru's b_hh; peep[k]: peephole's (3, H)."""

    cell: str
    gates: int  # G: H-wide blocks of a layer's pre-activations
    table0: Tensor
    rec: list[Tensor | None]
    inp: list[Tensor | None]
    bias: list[Tensor | None]
    bias_h: list[Tensor | None] = field(default_factory=list)
    peep: list[Tensor | None] = field(default_factory=list)


class NativeStep:
    """ids (B,) and the state (each (M, L, B, H)) -> logits (M, B, V) (or log-probs) and the new state, for M
    models of one cell class and shape, in one library call. Build with `native_step`."""

    def __init__(
        self, lib: ctypes.CDLL, specs: list[NativeSpec], heads: list[tuple[Tensor, Tensor]], dtype: str, state_count: int
    ):
        self.lib, self.dtype, self.count, self.state_count = lib, dtype, len(specs), state_count
        self.keep: list = []
        models = (_Model * len(specs))()
        for model, spec, (head_w, head_b) in zip(models, specs, heads):
            self._fill(model, spec, head_w, head_b)
        self.models = models
        self.layers, self.hidden, self.vocab = models[0].layers, models[0].H, models[0].V
        self._scratch_bytes: dict[int, int] = {}  # rows -> the library's working memory for a call

    def _tensor(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().float().cpu().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _fill(self, model: _Model, spec: NativeSpec, head_w: Tensor, head_b: Tensor) -> None:
        L = len(spec.rec)
        H = head_w.shape[1]
        mats = {name: (_Mat * L)() for name in ("rec", "inp")}
        for name in mats:
            for k, w in enumerate(getattr(spec, name)):
                if w is not None:
                    p = pack(w, self.dtype)
                    self.keep.append(p)
                    mats[name][k] = p.mat
        ptrs = {}
        for name in ("bias", "bias_h", "peep"):
            values = getattr(spec, name) or [None] * L
            arr = (ctypes.c_void_p * L)(*[self._tensor(v) for v in values])
            ptrs[name] = arr
        head = pack(head_w, self.dtype)
        self.keep += [mats, ptrs, head]
        model.cell, model.layers, model.H, model.V, model.G = CELLS[spec.cell], L, H, head_w.shape[0], spec.gates
        model.table0 = self._tensor(spec.table0)
        model.rec, model.inp = mats["rec"], mats["inp"]
        model.bias, model.bias_h, model.peep = ptrs["bias"], ptrs["bias_h"], ptrs["peep"]
        model.head, model.head_b = head.mat, self._tensor(head_b)

    def scratch(self, rows: int) -> Tensor:
        """The library's working memory for a call of `rows` rows: its own per call, so that two threads may
        step one model at once (a few tens of kB: far cheaper than the step)."""
        size = self._scratch_bytes.get(rows)
        if size is None:
            size = self._scratch_bytes[rows] = self.lib.cl_scratch_bytes(self.models, self.count, rows) + 64
        return torch.empty(size, dtype=torch.uint8)

    def __call__(self, ids: Tensor, state: tuple[Tensor, ...], log_probs: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
        """ids (B,), state tensors (M, L, B, H) -> logits or log-probs (M, B, V), the new state (new tensors:
        the given state is never written, so a caller may keep it)."""
        return self.run(ids, state, (self.count, ids.shape[0], self.vocab), log_probs)

    def run(
        self, ids: Tensor, state: tuple[Tensor, ...], out_shape: tuple[int, ...], log_probs: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The step with the state in any shape of the same memory layout ((L, B, H) for one model: no
        unsqueeze and index per step) and the output in out_shape (M * B * V elements)."""
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()  # kept in a name: the library reads its memory
        h = state[0]
        if any(s.dtype != torch.float32 or not s.is_contiguous() for s in state):
            state = tuple(s.float().contiguous() for s in state)
            h = state[0]
        B = ids.shape[0]
        size = self.count * self.layers * B * self.hidden  # the library reads this many values of each state tensor
        if len(state) != self.state_count or any(s.numel() != size for s in state):
            raise ValueError(
                f"a state of {self.state_count} tensors of {self.count}x{self.layers}x{B}x{self.hidden} values "
                f"for {B} ids, got {[tuple(s.shape) for s in state]}"
            )
        out = torch.empty(out_shape)
        h_new = torch.empty_like(h)
        if self.state_count > 1:
            c = state[1]
            c_new = torch.empty_like(c)
            new: tuple[Tensor, ...] = (h_new, c_new)
            c_in, c_out = c.data_ptr(), c_new.data_ptr()
        else:
            new, c_in, c_out = (h_new,), None, None
        scratch = self.scratch(B)
        rc = self.lib.cl_step(
            self.models,
            self.count,
            ids.data_ptr(),
            B,
            h.data_ptr(),
            c_in,
            h_new.data_ptr(),
            c_out,
            out.data_ptr(),
            log_probs,
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise IndexError(f"an id outside the vocabulary (0..{self.vocab - 1}) in {ids.tolist()}")
        return out, new


def native_step(cells: list, embeddings: list[Tensor], heads: list[tuple[Tensor, Tensor]], dtype: str) -> NativeStep | None:
    """The native step for these models (cells of one class and shape), or None where it does not apply:
    no library, not on the CPU, a dtype or cell it does not cover (a cell without `native_spec`)."""
    if dtype not in KINDS or any(w.device.type != "cpu" for w, _ in heads):
        return None
    spec_of = getattr(type(cells[0]), "native_spec", None)
    if spec_of is None or getattr(cells[0], "name", None) not in CELLS:  # a cell of another name has other equations
        return None
    lib = library()
    if lib is None:
        return None
    with torch.no_grad():
        specs = [spec_of(c, e.detach()) for c, e in zip(cells, embeddings)]
        return NativeStep(lib, specs, [(w.detach(), b.detach()) for w, b in heads], dtype, len(cells[0].state_names))
