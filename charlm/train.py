"""The training loop: truncated BPTT with a carried, detached state; clip, schedule, evaluate, checkpoint."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import charlm
from charlm import CharlmError, checkpoint
from charlm.allocator import keep_freed_memory
from charlm.config import ModelConfig, TrainConfig, as_dict
from charlm.data import PreparedData, StreamBatcher, row_span
from charlm.distributed import World
from charlm.evaluate import evaluate
from charlm.model import CharRNN, State, detach
from charlm.scorer import ModelScorer, autocast_for

LN2 = math.log(2)


class TrainingStopped(CharlmError):
    """Training ended early (Ctrl-C or a non-finite loss); the message says what was kept."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the training split
    window: int = 0  # next window within the epoch
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds of training so far, across resumes
    best_val: float = math.inf  # lowest validation bits/char so far
    best_step: int = 0


def pick_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is missing is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CharlmError(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if name == "mps" and not has_mps:
        raise CharlmError("--device mps, but MPS is not available here; use --device cpu")
    return torch.device(name)


def learning_rate(cfg: TrainConfig, step: int, fraction_done: float) -> float:
    """The schedule: linear warm-up, then constant, step decay, or cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_decay ** (step // cfg.decay_every)
    if cfg.schedule == "cosine":
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(fraction_done, 1.0)))
    return cfg.lr


class Trainer:
    """Owns the model, optimizer and data position for one run; `run()` trains until a limit is hit.

    Given a `World` of several ranks (distributed.py), it trains its own rows under DDP, and only
    rank 0 reports and writes files.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        data: PreparedData,
        out_dir: Path,
        resume: checkpoint.Checkpoint | None = None,
        init_from: checkpoint.Checkpoint | None = None,
        report: Callable[[str, dict], None] | None = None,
        world: World | None = None,
    ):
        keep_freed_memory()  # each step reuses the last step's pages instead of faulting in new ones
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.world = world or World()
        quiet = lambda kind, info: None  # noqa: E731
        self.report = (report or quiet) if self.world.is_main else quiet  # one voice: rank 0's
        self.device = self.world.place(pick_device(cfg.device))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed window shapes: let cuDNN pick its fastest kernels
        model_cfg.vocab_size = len(data.vocab)
        self.model_cfg = model_cfg
        self.train_tokens = data.tokens("train")
        self.rows = cfg.batch_size * self.world.size  # rows of the training layout, over all ranks
        self.batcher = StreamBatcher(self.train_tokens, self.rows, cfg.seq_length, rows=self.world.rows(cfg.batch_size))
        self.val_tokens = data.tokens("val")
        # Losses are per token; figures are per character of the text (a SentencePiece piece may
        # span several), converted with each split's own ratio, counted at prepare time.
        split = data.meta["splits"]["train"]
        self.chars_per_token = split["chars"] / max(split["tokens"], 1)
        val = data.meta["splits"]["val"]
        self.val_chars_per_token = val["chars"] / max(val["tokens"], 1)

        torch.manual_seed(cfg.seed)
        self.model = CharRNN(model_cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.progress = Progress()
        self.state: State | None = None
        for ckpt in (init_from, resume):
            if ckpt is not None and ckpt.vocab != data.vocab:
                raise CharlmError(f"{ckpt.path} was trained on a different vocabulary than {data.dir}")
        if init_from is not None:
            self.model.load_state_dict(init_from.model_state())
        if resume is not None:
            self._restore(resume)
        self.world.reseed(cfg.seed, self.progress.step)
        self.net = self.world.wrap(self.model)  # the module that trains: DDP averages gradients over ranks
        if cfg.compile:  # compiled lazily, on the first step; checkpoints keep using self.model
            self.net = torch.compile(self.net)

    # -- limits and schedule -------------------------------------------------------------
    def planned_steps(self) -> int | None:
        limits = []
        if self.cfg.max_steps is not None:
            limits.append(self.cfg.max_steps)
        if self.cfg.max_epochs is not None:
            limits.append(max(1, int(self.cfg.max_epochs * len(self.batcher))))
        return min(limits) if limits else None

    def fraction_done(self, elapsed: float) -> float:
        fractions = [0.0]
        if self.planned_steps():
            fractions.append(self.progress.step / self.planned_steps())
        if self.cfg.time_budget:
            fractions.append(elapsed / self.cfg.time_budget)
        return max(fractions)

    def _finished(self, elapsed: float) -> bool:
        if self.planned_steps() is None and self.cfg.time_budget is None:
            return self.progress.epoch >= 1  # no limit given: one epoch
        return self.fraction_done(elapsed) >= 1.0

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until max_steps / max_epochs / time_budget; returns the final metrics."""
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        interrupted = []
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):  # finish the step in flight, then save: the checkpoint stays consistent
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(True)

        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: Ctrl-C handling stays the caller's
            previous = None
        try:
            return self._loop(interrupted)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _loop(self, interrupted: list) -> dict:
        cfg, p = self.cfg, self.progress
        self.report("start", self.describe())
        start_time, start_elapsed = time.monotonic(), p.elapsed
        loss_sum = torch.zeros((), device=self.device)
        window_start, steps_in_window = time.monotonic(), 0
        train_bpc, stop, finished = math.nan, False, self._finished(p.elapsed)
        solo = self.world.size == 1
        while not finished:
            self._train_step(loss_sum)
            steps_in_window += 1
            clock = start_elapsed + time.monotonic() - start_time
            if solo:  # one process acts on its own clock and Ctrl-C at once
                p.elapsed = clock
            # Several ranks act on the clock and Ctrl-C only at a logging step, where sync_interval
            # shares them, so that every rank takes the same branches with the same learning rate.
            finished = self._finished(p.elapsed)
            if p.step % cfg.log_every == 0 or finished or (solo and interrupted):
                mean_loss, p.elapsed, stop = self.world.sync_interval(loss_sum, clock, bool(interrupted))  # the one host sync per interval
                finished = self._finished(p.elapsed)
                train_bpc = self._check_loss(mean_loss / steps_in_window)
                rate = steps_in_window * self.rows * cfg.seq_length * self.chars_per_token / (time.monotonic() - window_start)
                self._log({"kind": "train", **self._position(), "train_bpc": train_bpc, "lr": self._lr(), "chars_per_s": rate, "eta_s": self._eta(rate)})
                loss_sum.zero_()
                window_start, steps_in_window = time.monotonic(), 0
            if solo:
                stop = bool(interrupted)  # also a Ctrl-C that came while reporting
            if p.step % cfg.eval_every == 0 or finished or stop:
                self._evaluate_and_save(train_bpc)
            if stop:
                ranks = f" --nproc {self.world.size}" if self.world.size > 1 else ""
                raise TrainingStopped(
                    f"interrupted at step {p.step}; saved {self.out_dir / 'last.safetensors'} "
                    f"(continue with: charlm train --resume {self.out_dir / 'last.safetensors'}{ranks})"
                )
        return {**self._position(), "train_bpc": train_bpc, "best_val_bpc": p.best_val, "out_dir": str(self.out_dir)}

    def _train_step(self, loss_sum: torch.Tensor) -> None:
        cfg, p = self.cfg, self.progress
        if p.window == 0 or self.state is None:
            self.state = self.model.init_state(cfg.batch_size)  # a new epoch starts every row afresh
        x, y = self.batcher.window(p.window)
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.net.train()
        with autocast_for(self.device, cfg.dtype):
            logits, state = self.net(x, self.state)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        self.state = detach(state)  # truncated BPTT: carry the values, cut the graph
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        loss_sum += loss.detach()
        p.step += 1
        p.tokens += self.rows * cfg.seq_length  # over all ranks
        p.window += 1
        if p.window == len(self.batcher):
            p.window, p.epoch = 0, p.epoch + 1

    def _lr(self) -> float:
        return learning_rate(self.cfg, self.progress.step, self.fraction_done(self.progress.elapsed))

    def _eta(self, chars_per_s: float) -> float | None:
        etas = []
        if self.planned_steps():
            steps_left = self.planned_steps() - self.progress.step
            etas.append(steps_left * self.rows * self.cfg.seq_length * self.chars_per_token / max(chars_per_s, 1e-9))
        if self.cfg.time_budget:
            etas.append(self.cfg.time_budget - self.progress.elapsed)
        return max(min(etas), 0.0) if etas else None

    def _check_loss(self, mean: float) -> float:
        """Mean loss (nats/token) -> bits/char; a non-finite loss stops training before anything is saved."""
        if not math.isfinite(mean):
            best = self.out_dir / "best.safetensors"
            kept = f"{best} (val {self.progress.best_val:.4f} bits/char, step {self.progress.best_step}) is intact" if best.exists() else "no checkpoint was written"
            raise TrainingStopped(
                f"the training loss became {mean} by step {self.progress.step}; stopped without saving; {kept}. "
                "Try a lower --lr or a smaller --grad-clip"
            )
        return mean / LN2 / self.chars_per_token

    def validate(self) -> float:
        """Validation bits/char: the val split cut into one stream per training row, state carried through.

        With several ranks each scores its share of the streams and the sums are added up, so the
        figure is the one a single process with all the rows gets.
        """
        if len(self.val_tokens) < 2:
            return math.nan
        self.model.eval()
        scorer = ModelScorer(self.model, self.data.vocab, dtype=self.cfg.dtype)
        streams = max(1, min(self.rows, (len(self.val_tokens) - 1) // self.cfg.seq_length))
        lo, hi = self.world.share(streams)
        nll, tokens = 0.0, 0
        if hi > lo:
            mine = row_span(self.val_tokens, streams, lo, hi)
            part = evaluate(scorer, mine, self.val_chars_per_token, streams=hi - lo, window=self.cfg.seq_length)
            nll, tokens = part["nll"], part["tokens"]
        nll, tokens = self.world.all_reduce_sum([nll, tokens])
        return nll / LN2 / (tokens * self.val_chars_per_token) if tokens else math.nan

    def _evaluate_and_save(self, train_bpc: float) -> None:
        p = self.progress
        val = self.validate()
        if math.isnan(val):
            val_for_best = train_bpc  # no validation split: keep the lowest training figure instead
        else:
            if not math.isfinite(val):
                self._check_loss(val)
            val_for_best = val
        improved = val_for_best < p.best_val
        if improved:
            p.best_val, p.best_step = val_for_best, p.step
        self._log({"kind": "val", **self._position(), "val_bpc": val, "best_val_bpc": p.best_val})
        metrics = {**self._position(), "train_bpc": train_bpc, "val_bpc": val, "best_val_bpc": p.best_val, "best_step": p.best_step}
        hidden = self.world.gather_rows(self.state or ())  # every rank takes part; rank 0 gets all rows
        if self.world.is_main:
            checkpoint.save(self.out_dir / "last.safetensors", self.model, self._meta(metrics), self._train_tensors(hidden),
                            vocab=self.data.vocab)
            if improved:
                checkpoint.save(self.out_dir / "best.safetensors", self.model, self._meta(metrics), vocab=self.data.vocab)
        self.report("saved", {"step": p.step, "improved": improved, "out_dir": str(self.out_dir)})

    # -- reporting -----------------------------------------------------------------------
    def _position(self) -> dict:
        p = self.progress
        return {
            "step": p.step,
            "epoch": p.epoch + p.window / len(self.batcher),
            "chars_seen": int(p.tokens * self.chars_per_token),
            "elapsed_s": round(p.elapsed, 3),
        }

    def _log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.report(record["kind"], record)

    def describe(self) -> dict:
        return {
            "config": as_dict(self.model_cfg, self.cfg),
            "parameters": self.model.num_parameters(),
            "device": str(self.device) + (f" x {self.world.size} ranks ({self.world.backend})" if self.world.size > 1 else ""),
            "data": str(self.data.dir),
            "steps_per_epoch": len(self.batcher),
            "planned_steps": self.planned_steps(),
            "resumed_at": self.progress.step,
            "out_dir": str(self.out_dir),
        }

    # -- checkpoint state ----------------------------------------------------------------
    def _meta(self, metrics: dict) -> dict:
        return {
            **as_dict(self.model_cfg, self.cfg),
            "vocab": self.data.vocab.to_meta(),
            # The prepared dir's file name is left out: the model itself is the tokenizer.spm tensor.
            "tokenizer": {k: v for k, v in self.data.meta.get("tokenizer", {"kind": "char"}).items() if k != "file"},
            "metrics": metrics,
            "provenance": {
                "data_dir": str(self.data.dir.resolve()),
                "source_sha256": self.data.meta["source"]["sha256"],
                "source_paths": self.data.meta["source"]["paths"][:10],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "charlm_version": charlm.__version__,
                "torch_version": torch.__version__,
                "device": str(self.device),
                "world_size": self.world.size,
                "parameters": self.model.num_parameters(),
            },
            "train_state": asdict(self.progress),
        }

    def _train_tensors(self, hidden: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        tensors = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        for i, s in enumerate(hidden):
            tensors[f"hidden.{i}"] = s  # (num_layers, all rows, H)
        opt_state = self.optimizer.state_dict()["state"]
        for idx, slots in opt_state.items():
            for name, value in slots.items():
                tensors[f"optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return tensors

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        if "train_state" not in ckpt.meta or "rng.torch" not in ckpt.train_tensors():
            raise CharlmError(f"{ckpt.path} holds no training state (a best/exported file); resume from last.safetensors or use --init-from")
        self.model.load_state_dict(ckpt.model_state())
        tensors = ckpt.train_tensors()
        saved = self.optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda":
            cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        hidden = [tensors[k] for k in sorted(k for k in tensors if k.startswith("hidden."))]
        self.progress = Progress(**ckpt.meta["train_state"])
        self.state = None
        if hidden and hidden[0].shape[1] == self.rows:  # same rows (ranks x batch): each rank takes its own back
            self.state = tuple(h[:, self.world.rows(self.cfg.batch_size)].contiguous().to(self.device) for h in hidden)
        elif hidden:
            # Another row layout: the saved states belong to other rows, so every row starts from a
            # zero state, at the same fraction of the epoch.
            saved_windows = (len(self.train_tokens) - 1) // hidden[0].shape[1] // ckpt.meta["train"]["seq_length"]
            self.progress.window = self.progress.window * len(self.batcher) // max(saved_windows, 1)
        if self.progress.window >= len(self.batcher):  # batch layout changed: start the next epoch cleanly
            self.progress.window, self.progress.epoch, self.state = 0, self.progress.epoch + 1, None
