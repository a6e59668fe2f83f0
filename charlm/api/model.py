"""A trained model (or an ensemble of several) as one Python object: load, generate, stream, beam, score.

    lm = charlm.load("run/best.safetensors")                # or several paths: an ensemble
    lm.generate("ROMEO:", length=200, temperature=0.8, seed=1)
    for piece in lm.stream("ROMEO:", length=200): ...
    lm.score("Some text.").bits_per_char

The CLI's sample, beam and eval are this module's calls plus printing, so the same settings and
seed give the same text and figures from either.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from charlm import checkpoint, devices
from charlm import threads as threads_mod
from charlm.api.results import Beam, Score, check_finite, checkpoint_info, from_record  # noqa: F401 (API)
from charlm.api.scoring import static_score, text_tokens
from charlm.config import DECODE_DTYPES, DEVICES, DTYPES, ModelConfig
from charlm.decoding import dynamic
from charlm.decoding.beam import beam_search
from charlm.decoding.ensemble import Ensemble
from charlm.decoding.evaluate import scored_chars
from charlm.decoding.scorer import ModelScorer, Scorer
from charlm.decoding.streams import Streams, prime_ids, random_seed
from charlm.devices import check_dtype, pick_device
from charlm.errors import DataError, OptionError

if TYPE_CHECKING:
    from charlm.tokenizers.vocab import Vocab


def load(
    *checkpoints: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    weights: Sequence[float] | None = None,
    combine: str = "mean",
    threads: int | None = None,
) -> LanguageModel:
    """Load one checkpoint, or several as an ensemble (distributions averaged: combine="mean" or "geometric").

    device: auto (a GPU when there is one), cpu, cuda or mps. dtype: the precision of step-by-step
    generation (fp32, bf16, int8, or auto: the fastest for this machine); scoring is fp32 unless
    bf16 is asked for. weights: one per checkpoint for an ensemble. threads: the CPU threads its work
    runs on (default: the free cores, chosen per call by charlm/threads.py; $CHARLM_THREADS overrides).
    """
    threads_mod.mark()  # the first call's choice of threads reads the machine over the loading
    if not checkpoints:
        raise OptionError("give at least one checkpoint to load")
    paths = [Path(p) for p in checkpoints]
    if device not in DEVICES:
        raise OptionError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if dtype != "auto" and dtype not in DECODE_DTYPES:
        raise OptionError(f"--dtype must be one of auto, {', '.join(DECODE_DTYPES)} (got {dtype!r})")
    dev = pick_device(device)
    decode_dtype = devices.resolve_dtype(dev, "ensemble" if len(paths) > 1 else "step") if dtype == "auto" else dtype
    check_dtype(dev, decode_dtype)
    loaded = [checkpoint.load(p) for p in paths]
    members = [ModelScorer(c.build_model().to(dev), c.vocab, dtype=decode_dtype) for c in loaded]
    lm = LanguageModel(members, loaded, weights=weights, combine=combine, eval_dtype=dtype if dtype in DTYPES else None)
    lm.threads = None if threads is None else threads_mod.choose("step", threads)  # checked now, not at the first call
    return lm


class LanguageModel:
    """One model or an ensemble, ready to generate and score. Make one with charlm.load()."""

    def __init__(
        self,
        members: list[ModelScorer],
        checkpoints: list[checkpoint.Checkpoint],
        weights: Sequence[float] | None = None,
        combine: str = "mean",
        eval_dtype: str | None = None,
    ):
        self.members = members
        self._checkpoints = checkpoints
        self.weights = None if weights is None else [float(w) for w in weights]
        self.combine = combine
        self._eval_dtype = eval_dtype  # None: exact fp32 for scoring
        self.adaptation: Score | None = None  # on a copy adapted() returns: the figure while reading the text
        self.threads: int | None = None  # an explicit thread count; None: charlm/threads.py chooses per call
        # One model is its own Scorer; several (or one with a weight) are an Ensemble, which checks the vocabularies.
        self.scorer: Scorer = members[0] if len(members) == 1 and weights is None else Ensemble(members, self.weights, combine)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocab:
        """The vocabulary every member shares (characters, bytes or SentencePiece pieces)."""
        return self.scorer.vocab

    @property
    def config(self) -> ModelConfig:
        """The model's configuration (an ensemble's first member's; see info for each)."""
        return self._checkpoints[0].model_config

    @property
    def info(self) -> list[dict[str, Any]]:
        """Each checkpoint's metadata (model, train, metrics, provenance), one entry per member."""
        return [{"path": str(c.path), **copy.deepcopy(c.meta)} for c in self._checkpoints]

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self._checkpoints]

    @property
    def dtype(self) -> str:
        """The precision of step-by-step generation (what dtype="auto" resolved to)."""
        return self.members[0].dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def __repr__(self) -> str:
        what = str(self.paths[0]) if len(self.members) == 1 else f"ensemble of {len(self.members)} ({self.combine})"
        return f"LanguageModel({what}, {self.vocab.describe()}, {self.device}, {self.dtype})"

    # -- generation ----------------------------------------------------------------------------
    def streams(self, background_primes: bool = False) -> Streams:
        """A Streams object over this model: add streams, step them all together, remove them (charlm/decoding/streams.py).
        background_primes: primes run on a thread of their own while the batch steps (call close() when done)."""
        threads_mod.apply("batch", self.threads)
        return Streams(self.scorer, background_primes=background_primes)

    def stream(
        self,
        prime: str = "",
        length: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
    ) -> Iterator[str]:
        """Generate after `prime`, yielding the text as it is produced (the prime itself is not repeated)."""
        threads_mod.apply("step", self.threads)  # one stream: a character at a time
        streams = Streams(self.scorer)  # add() checks every argument now, not at the first next()
        streams.add(
            prime, length, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, stop=stop, unknown=unknown
        )
        return (event.text for event in streams.run() if event.text)

    def generate(
        self,
        prime: str = "",
        length: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
    ) -> str:
        """The text generated after `prime` (without the prime): `length` symbols, or up to a stop string (not included).

        The same seed gives the same text, from here, from `charlm sample --seed` and beside other streams.
        """
        return "".join(
            self.stream(
                prime,
                length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                seed=seed,
                stop=stop,
                unknown=unknown,
            )
        )

    def generate_many(
        self,
        primes: Sequence[str],
        length: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
    ) -> list[str]:
        """Generate after each prime, all streams stepped together as one batch. Stream i uses seed + i, so it
        equals generate(primes[i], seed=seed + i)."""
        texts = [""] * len(primes)
        for i, piece in self.stream_many(
            primes,
            length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            seed=seed,
            stop=stop,
            unknown=unknown,
        ):
            texts[i] += piece
        return texts

    def stream_many(
        self,
        primes: Sequence[str],
        length: int = 500,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
    ) -> Iterator[tuple[int, str]]:
        """generate_many as it is produced: (index of the prime, new text) pairs, step by step."""
        if isinstance(primes, str):
            raise OptionError("generate_many takes a list of primes; for one prime use generate")
        base = random_seed() >> 8 if seed is None else seed
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= 2**63 - 1 - len(primes):
            raise OptionError(f"--seed must be between 0 and 2^63-1 less the number of streams (got {seed!r})")
        streams = self.streams()
        index = {
            streams.add(
                p,
                length,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                seed=base + i,
                stop=stop,
                unknown=unknown,
            ): i
            for i, p in enumerate(primes)
        }
        return ((index[event.stream], event.text) for event in streams.run() if event.text)

    def beam(
        self,
        prime: str = "",
        length: int = 100,
        *,
        beam_width: int = 5,
        n_best: int = 1,
        length_penalty: float = 0.0,
        stop: str | None = None,
        unknown: str = "error",
    ) -> list[Beam]:
        """The n_best most likely continuations of `prime` by beam search, best first: (text, log-prob, tokens)."""
        stop_ids = None
        if stop:
            stop_ids = torch.from_numpy(np.asarray(self.vocab.encode(stop), dtype=np.int64))
        prime_t = torch.from_numpy(prime_ids(self.vocab, prime, unknown))
        threads_mod.apply("step" if beam_width <= 4 else "batch", self.threads)
        results = beam_search(self.scorer, prime_t, length, beam_width, n_best, length_penalty, stop_ids)
        return [Beam(self.vocab.decode(ids), logprob, len(ids)) for ids, logprob in results]

    # -- scoring -------------------------------------------------------------------------------
    def score(
        self,
        text: str | bytes | None = None,
        *,
        split: str | None = None,
        data: str | Path | None = None,
        unknown: str = "error",
        dynamic: bool = False,
        dyn_lr: float | None = None,
        dyn_decay: float | None = None,
        dyn_update: str = "auto",
        dyn_window: int | None = None,
    ) -> Score:
        """Bits per character of a text (or of a split of the prepared data the model was trained on), scored as
        one stream with the state carried through.

        dynamic=True: dynamic evaluation (the model takes a gradient step after each window it has
        scored; on a copy: this object's weights never change). unknown="skip" drops characters a
        char vocabulary lacks instead of refusing the text.
        """
        tokens, text_chars = text_tokens(self.vocab, self._checkpoints, text, split, data, unknown)
        threads_mod.apply("step", self.threads)  # one stream, the state carried through
        if len(tokens) < 2:
            raise DataError("the text to score has fewer than 2 characters")
        chars = scored_chars(self.vocab, tokens, text_chars)
        if chars < 1:
            raise DataError("the text to score spells no character after its first token: nothing to score")
        if dynamic:
            return self._dynamic_score(tokens, chars, dyn_update, dyn_lr, dyn_decay, dyn_window)
        dynamic_options_given = dyn_lr is not None or dyn_decay is not None or dyn_window is not None or dyn_update != "auto"
        if dynamic_options_given:
            raise OptionError("the dyn_* options go with dynamic=True (--dynamic)")
        scorers = self._eval_scorers()
        whole = static_score(
            scorers[0] if len(scorers) == 1 and self.weights is None else Ensemble(scorers, self.weights, self.combine),
            tokens,
            chars,
        )
        if len(scorers) > 1:
            whole = replace(whole, members=[self._member_static(m, tokens, chars) for m in scorers])
        check_finite(whole, self.paths, "")
        return whole

    def adapted(
        self,
        text: str,
        *,
        unknown: str = "error",
        dyn_lr: float | None = None,
        dyn_decay: float | None = None,
        dyn_update: str = "auto",
        dyn_window: int | None = None,
    ) -> LanguageModel:
        """A copy of this model adapted to `text` by dynamic evaluation over it (as `charlm sample --adapt`), to
        generate in its style. The copy's `adaptation` holds the figure while reading it and the settings."""
        self._refuse_union("adapting")
        if not text:
            raise DataError("the text to adapt to is empty: nothing to adapt to")
        tokens = np.asarray(self.vocab.encode(text, unknown), dtype=np.int64)
        threads_mod.apply("step", self.threads)
        if len(tokens) < 2:
            raise DataError("the text to adapt to has fewer than 2 symbols the model knows: nothing to adapt to")
        members = [ModelScorer(copy.deepcopy(m.model), m.vocab, dtype=m.dtype) for m in self.members]
        twin = LanguageModel(members, self._checkpoints, self.weights, self.combine, self._eval_dtype)
        twin.adaptation = twin._adapt_in_place(tokens, len(tokens), dyn_update, dyn_lr, dyn_decay, dyn_window)
        return twin

    # -- internals -----------------------------------------------------------------------------
    def _eval_scorers(self) -> list[ModelScorer]:
        """The members as scorers in the scoring precision: exact fp32 unless bf16 was asked for at load."""
        dtype = self._eval_dtype or "fp32"  # load() keeps only fp32 or bf16 here: an int8 model scores in fp32
        return [m if m.dtype == dtype else ModelScorer(m.model, m.vocab, dtype=dtype) for m in self.members]

    def _member_static(self, member: ModelScorer, tokens: np.ndarray, chars: int) -> Score:
        """A member's own figure on the ensemble's text. In a union-vocabulary ensemble the symbols it never saw
        are left out of its text (as unknown="skip" would), so its figure covers the rest only."""
        if member.vocab == self.vocab:
            return static_score(member, tokens, chars)
        own = member.vocab.lookup(self.vocab.codes[tokens])  # -1: a symbol this member lacks
        kept = own[own >= 0]
        return static_score(member, kept, scored_chars(member.vocab, kept, len(kept)))

    def _refuse_union(self, what: str) -> None:
        if isinstance(self.scorer, Ensemble) and self.scorer.union:
            raise OptionError(
                f"{what} needs ensemble members that share one vocabulary (these differ: each adapts on its "
                "own symbols); score or sample the union ensemble statically, or adapt the members one by one"
            )

    def _dynamic_score(self, tokens: np.ndarray, chars: int, update: str, lr, decay, window) -> Score:
        self._refuse_union("dynamic evaluation")
        if self._eval_dtype not in (None, "fp32"):
            raise OptionError(f"dynamic evaluation runs in fp32 (it takes gradient steps); leave out --dtype {self._eval_dtype}")
        members = [ModelScorer(copy.deepcopy(m.model), m.vocab, dtype="fp32") for m in self.members]
        twin = LanguageModel(members, self._checkpoints, self.weights, self.combine, "fp32")
        result = twin._adapt_in_place(tokens, chars, update, lr, decay, window)
        check_finite(result, self.paths, "; with dynamic evaluation, try a lower --dyn-lr")
        return result

    def _adapt_in_place(self, tokens: np.ndarray, chars: float, update: str, lr, decay, window) -> Score:
        """Dynamic evaluation over tokens, leaving this object's members adapted (callers pass a copy)."""
        sources = [
            dynamic.AdaptSource(int(c.meta["train"]["seq_length"]), checkpoint.gradient_second_moments(c))
            for c in self._checkpoints
        ]
        settings, note = dynamic.resolve(sources, [str(p) for p in self.paths], update, lr, decay, window)
        adapters = [dynamic.Adapter(m.model, settings, s.mean_sq) for m, s in zip(self.members, sources)]
        combine = self.scorer.combine_logprobs if isinstance(self.scorer, Ensemble) else None
        record: list[torch.Tensor] = []
        whole, per_member = dynamic.dynamic_evaluate(adapters, tokens, chars, combine, record=record)
        described = {
            "update": settings.update,
            "lr": settings.lr,
            "decay": settings.decay,
            "window": settings.window,
            "note": note,
        }
        logprobs = -torch.cat(record, dim=-1).flatten().numpy() if record else np.zeros(0)
        members = [from_record(r) for r in per_member] if len(self.members) > 1 else []
        return replace(from_record(whole), logprobs=logprobs, members=members, dynamic=described)
