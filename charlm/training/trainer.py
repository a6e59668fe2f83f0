"""The training loop: truncated BPTT with a carried, detached state; clip, schedule, evaluate, checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import charlm
from charlm import checkpoint, threads
from charlm.allocator import keep_freed_memory
from charlm.config import ModelConfig, TrainConfig, as_dict
from charlm.data import PreparedData, StreamBatcher, row_span
from charlm.decoding.evaluate import bits_per_char, evaluate
from charlm.decoding.scorer import ModelScorer
from charlm.devices import autocast_for, check_dtype, pick_device, resolve_dtype
from charlm.errors import CharlmError
from charlm.model import CharRNN, State, detach
from charlm.training import grow, rundir
from charlm.training.distributed import World
from charlm.training.progress import Progress
from charlm.training.schedule import learning_rate
from charlm.training.scheduled import ScheduledSampler


class TrainingStopped(CharlmError):
    """Training ended early (a stop signal or a non-finite loss); the message says what was kept."""


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
        stop: Callable[[], str | None] | None = None,
    ):
        keep_freed_memory()  # each step reuses the last step's pages instead of faulting in new ones
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.world = world or World()
        self.stop_requested = stop or (lambda: None)  # the CLI's signal handlers: 'SIGTERM', ... or None
        self.resumed = resume is not None
        quiet = lambda kind, info: None  # noqa: E731
        self.report = (report or quiet) if self.world.is_main else quiet  # one voice: rank 0's
        self.device = self.world.place(pick_device(cfg.device))
        # The precision the steps run in: cfg.dtype as given, or what "auto" means on this device. The
        # config (and so the checkpoint's train section) keeps "auto", so that a run resumed on another
        # machine chooses again; the checkpoint's provenance records what this run used.
        self.dtype = resolve_dtype(self.device, "train") if cfg.dtype == "auto" else cfg.dtype
        check_dtype(self.device, self.dtype)
        self.threads: threads.Follower | None = None  # chosen when run() starts (threads.py)
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
        if resume is not None and resume.vocab != data.vocab:
            raise CharlmError(f"{resume.path} was trained on a different vocabulary than {data.dir}")
        if init_from is not None:
            grow.load_into(self.model, init_from, data)  # the vocabulary grows when the text has new characters
        self.frozen = grow.frozen_parameters(self.model, cfg.freeze_layers) if cfg.freeze_steps else []
        self.lineage = grow.lineage(init_from, data) if init_from is not None else grow.recorded_lineage(resume)
        if resume is not None:
            self._restore(resume)
        self.world.reseed(cfg.seed, self.progress.step)
        self.sampler = ScheduledSampler(cfg, model_cfg.vocab_size, self.world.rank) if cfg.scheduled_sampling != "none" else None
        # The module that trains (DDP, compiled) exists only while run() runs: see _training_net.
        self.net: Any = None  # nn.Module, DDP or torch.compile's wrapper

    def _training_net(self) -> Any:
        """The module the steps run: the model, under DDP with several ranks (it averages gradients),
        compiled with --compile (lazily, on the first step; checkpoints keep using self.model).

        Made when training starts and dropped when it ends (run's finally), so that no trainer, kept
        or not, holds DDP's reducer, which holds the process group that the caller destroys after
        run(): a group that outlives destroy_process_group() keeps Gloo's threads running into
        interpreter shutdown, where a rank now and then aborts ("terminate called without an active
        exception") or hangs (distributed.py, _import_group_defaults, has the other such holder).
        """
        net = self.world.wrap(self.model)
        return torch.compile(net) if self.cfg.compile else net

    # -- limits and schedule -------------------------------------------------------------
    def planned_steps(self) -> int | None:
        """The step limit; with no limit of any kind, one epoch (so a cosine schedule decays over it)."""
        limits = []
        if self.cfg.max_steps is not None:
            limits.append(self.cfg.max_steps)
        if self.cfg.max_epochs is not None:
            limits.append(max(1, int(self.cfg.max_epochs * len(self.batcher))))
        if not limits and self.cfg.time_budget is None:
            limits.append(len(self.batcher))
        return min(limits) if limits else None

    def fraction_done(self, elapsed: float) -> float:
        fractions = [0.0]
        if self.planned_steps():
            fractions.append(self.progress.step / self.planned_steps())
        if self.cfg.time_budget:
            fractions.append(elapsed / self.cfg.time_budget)
        return max(fractions)

    def _finished(self, elapsed: float) -> bool:
        return self.fraction_done(elapsed) >= 1.0

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until max_steps / max_epochs / time_budget, or until `stop` says so; returns the final metrics.

        The run dir must be claimed first (rundir.claim; the CLI does it). On resume the metrics
        log is cut back to the checkpoint's step, so that it reads as one run.
        """
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_parts(self.out_dir)
            if self.resumed:
                rundir.continue_metrics(self.out_dir, self.progress.step)
        follower = self.threads = threads.Follower("train", ranks=self.world.local_size)
        self.net = self._training_net()
        try:
            return self._loop(follower)
        finally:
            self.net = None  # the DDP wrapper goes now, before the caller destroys the process group

    def _loop(self, follower: threads.Follower) -> dict:
        cfg, p = self.cfg, self.progress
        self.report("start", self.describe())
        start_time, start_elapsed = time.monotonic(), p.elapsed
        loss_sum = torch.zeros((), device=self.device)
        window_start, steps_in_window = time.monotonic(), 0
        train_bpc, stop, finished = math.nan, False, self._finished(p.elapsed)
        solo = self.world.size == 1
        while not finished:
            self.step(loss_sum)
            steps_in_window += 1
            clock = start_elapsed + time.monotonic() - start_time
            if solo:  # one process acts on its own clock and a stop signal at once
                p.elapsed = clock
            # Several ranks act on the clock and a stop signal only at a logging step, where sync_interval
            # shares them, so that every rank takes the same branches with the same learning rate.
            finished = self._finished(p.elapsed)
            if p.step % cfg.log_every == 0 or finished or (solo and self.stop_requested()):
                # The one host sync per interval; several ranks agree here on the clock and on stopping.
                mean_loss, p.elapsed, stop = self.world.sync_interval(loss_sum, clock, self.stop_requested() is not None)
                follower.poll()  # another process started or ended beside this one: follow the free cores
                finished = self._finished(p.elapsed)
                train_bpc = self._check_loss(mean_loss / steps_in_window)
                rate = steps_in_window * self.rows * cfg.seq_length * self.chars_per_token / (time.monotonic() - window_start)
                self._log(
                    {
                        "kind": "train",
                        **self._position(),
                        "train_bpc": train_bpc,
                        "lr": self._lr(),
                        "chars_per_s": rate,
                        "eta_s": self._eta(rate),
                        "threads": follower.threads,
                    }
                )
                loss_sum.zero_()
                window_start, steps_in_window = time.monotonic(), 0
            if solo:
                stop = self.stop_requested() is not None  # also a signal that came while reporting
            if stop:  # no validation: a preempted run may have seconds left (torchrun waits 30 s)
                self._save({**self._position(), "train_bpc": train_bpc}, improved=False)
                ranks = f" --nproc {self.world.size}" if self.world.size > 1 else ""
                signal = self.stop_requested() or "SIGINT"  # another rank may have been the one signalled
                reason = "interrupted" if signal == "SIGINT" else f"stopped by {signal}"
                raise TrainingStopped(
                    f"{reason} at step {p.step}; saved {self.out_dir / 'last.safetensors'} "
                    f"(continue with: charlm train --resume {self.out_dir / 'last.safetensors'}{ranks})"
                )
            if p.step % cfg.eval_every == 0 or finished:
                self._evaluate_and_save(train_bpc)
        return {**self._position(), "train_bpc": train_bpc, "best_val_bpc": p.best_val, "out_dir": str(self.out_dir)}

    def step(self, loss_sum: torch.Tensor) -> None:
        """One optimizer step on the next window; its loss is added to loss_sum (on the device: no sync here)."""
        cfg, p = self.cfg, self.progress
        if p.window == 0 or self.state is None:
            self.state = self.model.init_state(cfg.batch_size)  # a new epoch starts every row afresh
        x, y = self.batcher.window(p.window)
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.sampler is not None:  # inputs mixed with the model's own predictions (scheduled.py)
            x = self.sampler.inputs(self.model, x, self.state, p.ss_step)
            p.ss_replace, p.ss_step = self.sampler.replace_probability(p.ss_step), p.ss_step + 1
        net = self.net if self.net is not None else self.model  # step() called on its own (bench): the model itself
        net.train()
        with autocast_for(self.device, self.dtype):
            logits, state = net(x, self.state)  # (B, T, V); the loss is against the true y whatever x was
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        self.state = detach(state)  # truncated BPTT: carry the values, cut the graph
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.step < cfg.freeze_steps:  # fine-tuning: the lower layers wait (grow.frozen_parameters)
            for param in self.frozen:
                param.grad = None  # AdamW leaves a parameter without a gradient as it is, moments and decay included
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
            kept = (
                f"{best} (val {self.progress.best_val:.4f} bits/char, step {self.progress.best_step}) is intact"
                if best.exists()
                else "no checkpoint was written"
            )
            raise TrainingStopped(
                f"the training loss became {mean} by step {self.progress.step}; stopped without saving; {kept}. "
                "Try a lower --lr or a smaller --grad-clip"
            )
        return bits_per_char(mean, self.chars_per_token)  # per token: nats -> bits per its characters

    def validate(self) -> float:
        """Validation bits/char: the val split cut into one stream per training row, state carried through.

        With several ranks each scores its share of the streams and the sums are added up, so the
        figure is the one a single process with all the rows gets.
        """
        if len(self.val_tokens) < 2:
            return math.nan
        self.model.eval()
        scorer = ModelScorer(self.model, self.data.vocab, dtype=self.dtype)
        streams = max(1, min(self.rows, (len(self.val_tokens) - 1) // self.cfg.seq_length))
        lo, hi = self.world.share(streams)
        nll, tokens = 0.0, 0
        if hi > lo:
            mine = row_span(self.val_tokens, streams, lo, hi)
            part = evaluate(scorer, mine, self.val_chars_per_token, streams=hi - lo, window=self.cfg.seq_length)
            nll, tokens = part["nll"], part["tokens"]
        nll, tokens = self.world.all_reduce_sum([nll, tokens])
        return bits_per_char(nll, tokens * self.val_chars_per_token)

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
        self._save({**self._position(), "train_bpc": train_bpc, "val_bpc": val}, improved)

    def _save(self, metrics: dict, improved: bool) -> None:
        """last.safetensors (with the training state), and best.safetensors when validation improved."""
        p = self.progress
        metrics = {**metrics, "best_val_bpc": p.best_val, "best_step": p.best_step}
        hidden = self.world.gather_rows(self.state or ())  # every rank takes part; rank 0 gets all rows
        if self.world.is_main:
            checkpoint.save(
                self.out_dir / rundir.LAST, self.model, self._meta(metrics), self._train_tensors(hidden), vocab=self.data.vocab
            )
            if improved:
                checkpoint.save(self.out_dir / rundir.BEST, self.model, self._meta(metrics), vocab=self.data.vocab)
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
        rundir.append_record(self.out_dir, record)
        self.report(record["kind"], record)

    def describe(self) -> dict:
        """The run's facts, reported once at the start ("start"): config, size, where and how it runs."""
        ranks = f" x {self.world.size} ranks ({self.world.backend})" if self.world.size > 1 else ""
        how = f"{self.dtype}{' (auto)' if self.cfg.dtype == 'auto' else ''}"
        if self.threads is not None:
            how += f", {self.threads.threads} thread{'s' if self.threads.threads != 1 else ''}{'' if self.threads.fixed else ' (the free cores)'}"
        return {
            "config": as_dict(self.model_cfg, self.cfg),
            "parameters": self.model.num_parameters(),
            "device": f"{self.device}{ranks}, {how}",
            "dtype": self.dtype,
            "threads": self.threads.threads if self.threads is not None else None,
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
                "dtype": self.dtype,  # what the steps ran in: train.dtype may say "auto"
                "threads": self.threads.threads if self.threads is not None else None,  # per rank, at this save
                "world_size": self.world.size,
                "parameters": self.model.num_parameters(),
                **({"fine_tuned_from": self.lineage} if self.lineage else {}),
            },
            "train_state": asdict(self.progress),
        }

    def _train_tensors(self, hidden: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return checkpoint.pack_train_state(self.optimizer, hidden, cuda=self.device.type == "cuda")

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        # Checked against this model and optimizer before either (or the RNG) is touched.
        fields, hidden = checkpoint.unpack_train_state(ckpt, self.model, self.optimizer, Progress, self.device)
        self.progress = Progress(**fields)
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
