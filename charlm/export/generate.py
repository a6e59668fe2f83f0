#!/usr/bin/env python3
"""Generate text from a charlm model exported to ONNX, without PyTorch or charlm: numpy and onnxruntime only.

    pip install numpy onnxruntime            # (and sentencepiece, for a prime to a SentencePiece model)
    python generate.py --prime "ROMEO:" --length 300 --temperature 0.8 --seed 7
    python generate.py --greedy --length 300

`charlm export --onnx DIR` writes this file beside DIR/model.onnx; the two can be copied anywhere.
It decodes as `charlm sample` does: the prime through the network, then one step per symbol,
greedy or temperature -> top-k -> top-p -> a draw by inverse CDF from Python's random.Random(seed)
(stream i of --num-samples uses seed + i), so the same seed gives the same text as `charlm sample
--seed` up to float rounding (onnxruntime's kernels are not torch's: a draw that lands within
~1e-7 of a boundary between two symbols can go the other way). Everything it needs to know about
the model (vocabulary, state shapes, start symbol) is in the model file's metadata.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import json
import os
import random
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

FORMAT, FORMAT_VERSION = "charlm-onnx-step", 1
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-30  # as charlm: below it float32 cannot divide by the temperature


class GenerateError(Exception):
    """A problem with the arguments or the model file: printed as one line, exit code 1."""


class Tokenizer:
    """The model's vocabulary from its `charlm.tokenizer` record: ids -> text, and a prime -> ids."""

    def __init__(self, record: dict):
        self.kind = record["kind"]
        self.start = [int(i) for i in record["start"]]
        if self.kind == "char":
            self.symbols = list(record["symbols"])
            self.size = len(self.symbols)
            self._index = {c: i for i, c in enumerate(self.symbols)}
        elif self.kind == "bytes":
            self.pieces = [bytes([b]) for b in record["bytes"]]
            self.size = len(self.pieces)
            self._index = {b: i for i, b in enumerate(record["bytes"])}
        else:  # spm: pieces' bytes for decoding; the SentencePiece model only to encode a prime
            self.pieces = [bytes.fromhex(h) for h in record["pieces"]]
            self.size = len(self.pieces)
            self._record = record

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """The prime's ids; unknown='skip' drops what a char/bytes vocabulary lacks, 'error' refuses it."""
        if self.kind == "spm":
            return self._encode_spm(text)
        units = list(text) if self.kind == "char" else list(text.encode("utf-8"))
        missing = sorted({u for u in units if u not in self._index})
        if missing and unknown == "error":
            shown = ", ".join(repr(u) if self.kind == "char" else f"0x{u:02X}" for u in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise GenerateError(
                f"{len(missing)} character(s) not in the model's vocabulary: {shown}{more} (--unknown skip drops them)"
            )
        return [self._index[u] for u in units if u in self._index]

    def _encode_spm(self, text: str) -> list[int]:
        try:
            import sentencepiece
        except ImportError:
            raise GenerateError(
                "a prime for a SentencePiece model needs the sentencepiece package: pip install sentencepiece"
            ) from None
        sp = sentencepiece.SentencePieceProcessor(model_proto=base64.b64decode(self._record["model"]))
        ids: list[int] = []
        for k, part in enumerate(text.split("\u2581")):  # a literal "▁" goes in as its bytes, as charlm encodes it
            if k:
                ids += self._record["space_ids"]
            if part:
                ids += sp.encode(part)
        return ids

    def decoder(self) -> Callable[[int], str]:
        """id -> text, for streaming: bytes of a character split over several ids are held until it is whole."""
        if self.kind == "char":
            return self.symbols.__getitem__
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: incremental.decode(self.pieces[i])


class Model:
    """The ONNX step graph: ids (B,) and the state -> log-probs (B, V) and the new state."""

    def __init__(self, path: Path, threads: int = 1):
        if not path.is_file():
            raise GenerateError(f"no model at {path} (give --model PATH)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # one stream's step is small: threads cost more than they give
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("charlm.format") != FORMAT:
            raise GenerateError(f"{path} is not a charlm step graph (no charlm.format metadata)")
        if int(meta.get("charlm.format_version", "0")) > FORMAT_VERSION:
            raise GenerateError(f"{path} is a newer charlm export (format {meta['charlm.format_version']}); update generate.py")
        self.meta = {k[len("charlm.") :]: v for k, v in meta.items() if k.startswith("charlm.")}
        self.tokenizer = Tokenizer(json.loads(self.meta["tokenizer"]))
        self.states = json.loads(self.meta["states"])
        self.outputs = ["logprobs", *(s["output"] for s in self.states)]

    def start(self, batch: int) -> dict[str, np.ndarray]:
        """The zero state of `batch` streams, as the graph's inputs."""
        return {s["input"]: np.zeros((s["layers"], batch, s["size"]), dtype=np.float32) for s in self.states}

    def step(self, ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        got = self.session.run(self.outputs, {"ids": ids.astype(np.int64), **state})
        return got[0], {s["input"]: v for s, v in zip(self.states, got[1:])}

    def prime(self, ids: Sequence[int], batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the prime through the network for `batch` streams: the log-probs after its last id, and the state."""
        state, logp = self.start(batch), None
        for i in ids:
            logp, state = self.step(np.full(batch, i, dtype=np.int64), state)
        assert logp is not None
        return logp, state


class Sampler:
    """How the next symbol is picked, as charlm's processors do it: greedy, or temperature -> top-k -> top-p -> draw."""

    def __init__(self, greedy: bool, temperature: float, top_k: int | None, top_p: float | None):
        if not greedy:
            if not (temperature > 0 and temperature < float("inf")):
                raise GenerateError(
                    f"--temperature must be a finite number > 0 (got {temperature}); for deterministic decoding use --greedy"
                )
            if temperature < MIN_TEMPERATURE:
                raise GenerateError(f"--temperature must be at least {MIN_TEMPERATURE} (got {temperature}); use --greedy")
            if top_k is not None and top_k < 1:
                raise GenerateError(f"--top-k must be at least 1 (got {top_k})")
            if top_p is not None and not 0 < top_p <= 1:
                raise GenerateError(f"--top-p must be in (0, 1] (got {top_p})")
        self.greedy, self.temperature, self.top_k, self.top_p = greedy, temperature, top_k, top_p

    def __call__(self, logp: np.ndarray, rngs: Sequence[random.Random]) -> np.ndarray:
        """One symbol per row of logp (B, V); row i draws its uniform number from rngs[i]."""
        if self.greedy:
            return logp.argmax(axis=-1)
        logits = logp if self.temperature == 1.0 else logp / np.float32(self.temperature)
        V = logits.shape[-1]
        if self.top_k is not None and self.top_k < V:
            kth = -np.partition(-logits, self.top_k - 1, axis=-1)[:, self.top_k - 1 : self.top_k]
            logits = np.where(logits < kth, np.float32(-np.inf), logits)
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(-logits, axis=-1, kind="stable")
            probs = softmax(np.take_along_axis(logits, order, axis=-1))
            drop_sorted = probs.cumsum(axis=-1) - probs >= self.top_p  # the mass before this symbol already reaches p
            drop = np.empty_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            logits = np.where(drop, np.float32(-np.inf), logits)
        uniforms = np.array([r.random() for r in rngs], dtype=np.float64)
        return draw(logits, uniforms)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def draw(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """charlm's draw: the first symbol whose cumulative probability (float64) exceeds the row's uniform number times the total."""
    cdf = softmax(logits).astype(np.float64).cumsum(axis=-1)  # (B, V)
    target = uniforms * cdf[:, -1]
    picked = np.array([np.searchsorted(row, t, side="right") for row, t in zip(cdf, target)])
    return np.minimum(picked, logits.shape[-1] - 1)


def generate(
    model: Model, prime: str, length: int, sampler: Sampler, seed: int, samples: int = 1, unknown: str = "error"
) -> Iterator[list[str]]:
    """Yield, per step, each stream's new text; `samples` streams step together, stream i seeded with seed + i."""
    ids = model.tokenizer.encode(prime, unknown) if prime else []
    logp, state = model.prime(ids or model.tokenizer.start, samples)
    rngs = [random.Random(seed + i) for i in range(samples)]
    decoders = [model.tokenizer.decoder() for _ in range(samples)]
    for t in range(length):
        nxt = sampler(logp, rngs)
        yield [decode(int(i)) for decode, i in zip(decoders, nxt)]
        if t + 1 < length:
            logp, state = model.step(nxt, state)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text from a charlm ONNX export (numpy + onnxruntime, no PyTorch).")
    p.add_argument(
        "--model",
        type=Path,
        default=Path(__file__).resolve().parent / "model.onnx",
        help="the exported model (default: model.onnx beside this file)",
    )
    p.add_argument("--prime", default="", help="text to start from (printed, then continued)")
    p.add_argument("--prime-file", type=Path, help="read the prime from a UTF-8 file instead")
    p.add_argument("--unknown", choices=("error", "skip"), default="error", help="prime characters outside the vocabulary")
    p.add_argument(
        "--length", type=int, default=500, help="symbols to generate (characters, or pieces for a SentencePiece model)"
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely symbol")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 is more conservative")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely symbols")
    p.add_argument("--top-p", type=float, default=None, help="sample only within the top probability mass p")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (sample i uses seed + i - 1)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples, generated together as one batch")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1 is fastest for one stream of a small model)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.prime_file is not None:
            if args.prime:
                raise GenerateError("give either --prime TEXT or --prime-file FILE, not both")
            args.prime = args.prime_file.read_bytes().decode("utf-8-sig")
        if args.length < 0:
            raise GenerateError(f"--length must be >= 0 (got {args.length})")
        if args.num_samples < 1:
            raise GenerateError(f"--num-samples must be at least 1 (got {args.num_samples})")
        seed = int.from_bytes(os.urandom(8), "little") >> 9 if args.seed is None else args.seed
        if not 0 <= seed <= MAX_SEED - args.num_samples:
            raise GenerateError(f"--seed must be between 0 and 2^63-1 (got {seed})")
        sampler = Sampler(args.greedy, args.temperature, args.top_k, args.top_p)
        model = Model(args.model, args.threads)
        out = sys.stdout
        if args.num_samples == 1:
            out.write(args.prime)
            for (piece,) in generate(model, args.prime, args.length, sampler, seed, 1, args.unknown):
                out.write(piece)
                out.flush()
            out.write("\n")
            return 0
        texts = ["" for _ in range(args.num_samples)]
        for pieces in generate(model, args.prime, args.length, sampler, seed, args.num_samples, args.unknown):
            texts = [t + p for t, p in zip(texts, pieces)]
        for i, text in enumerate(texts):
            print(f"── sample {i + 1}/{args.num_samples} ──", file=sys.stderr)
            out.write(args.prime + text + "\n")
        return 0
    except (GenerateError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
