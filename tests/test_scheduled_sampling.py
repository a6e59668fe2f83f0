"""Scheduled sampling (charlm/training/scheduled.py): the schedules, plain training at probability 0,
every input a prediction at probability 1, exact resume, bad options."""

import copy
import math

import pytest
import torch
from conftest import FAST, assert_clean_error, run, small_configs

from charlm import CharlmError, checkpoint, config
from charlm.training.scheduled import ScheduledSampler, teacher_forcing
from charlm.training.trainer import Trainer, TrainingStopped


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tf(schedule, k, floor, i):
    return teacher_forcing(config.TrainConfig(scheduled_sampling=schedule, ss_k=k, ss_floor=floor), i)


def test_the_three_decays_of_the_paper_with_a_floor():
    assert tf("none", None, 0.0, 10**6) == 1.0
    assert [tf("linear", 100, 0.0, i) for i in (0, 25, 50, 100, 500)] == pytest.approx([1, 0.75, 0.5, 0, 0])
    assert tf("linear", 100, 0.3, 90) == pytest.approx(0.3)
    assert [tf("exponential", 0.99, 0.0, i) for i in (0, 1, 100)] == pytest.approx([1, 0.99, 0.99**100])
    assert tf("inverse-sigmoid", 10, 0.0, 0) == pytest.approx(10 / 11)
    assert tf("inverse-sigmoid", 10, 0.0, 10 * math.log(10)) == pytest.approx(0.5)
    assert tf("inverse-sigmoid", 10, 0.0, 10**9) == pytest.approx(0.0)  # no overflow far along
    assert tf("exponential", None, 0.0, 693) == pytest.approx(0.5, abs=1e-3)  # the default k


@pytest.mark.parametrize("mode", ["model", "uniform"])
def test_probability_zero_is_plain_training_step_by_step(tmp_path, prepared, mode):
    """Teacher forcing always (floor 1): the same weights as plain training after every step, dropout on."""
    model_cfg, cfg = small_configs(max_steps=8)
    model_cfg.dropout = 0.2

    def steps(train_cfg, out):
        trainer = Trainer(copy.deepcopy(model_cfg), train_cfg, prepared, tmp_path / out)  # seeds the global generator
        after = []
        for _ in range(8):
            trainer.step(torch.zeros(()))
            after.append(params(trainer.model))
        return trainer, after

    _, plain = steps(copy.deepcopy(cfg), "plain")
    ss_cfg = copy.deepcopy(cfg)
    ss_cfg.scheduled_sampling, ss_cfg.ss_k, ss_cfg.ss_floor, ss_cfg.ss_mode = "linear", 1.0, 1.0, mode
    scheduled, with_ss = steps(ss_cfg, "ss")
    for a, b in zip(plain, with_ss):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert scheduled.progress.ss_step == 8 and scheduled.progress.ss_replace == 0.0
    # The check can fail: a schedule that replaces inputs trains other weights.
    other_cfg = copy.deepcopy(ss_cfg)
    other_cfg.ss_floor = 0.0
    _, other = steps(other_cfg, "other")
    assert not all(torch.equal(plain[-1][k], other[-1][k]) for k in plain[-1])


def _inputs_seen(trainer):
    """The inputs of every forward call of the trainer's model, in order."""
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_probability_one_feeds_the_models_predictions_after_the_first_input(tmp_path, prepared):
    model_cfg, cfg = small_configs(lr=1e-9, scheduled_sampling="linear", ss_k=1.0, ss_floor=0.0)
    trainer = Trainer(model_cfg, cfg, prepared, tmp_path / "run")
    trainer.step(torch.zeros(()))  # schedule step 0: eps = 1, nothing replaced
    favourite = 5
    with torch.no_grad():  # a model whose every prediction is symbol 5
        trainer.model.head.weight.zero_()
        trainer.model.head.bias.fill_(-30.0)
        trainer.model.head.bias[favourite] = 30.0
    seen = _inputs_seen(trainer)
    rng = torch.get_rng_state()
    x, _ = trainer.batcher.window(1)
    trainer.step(torch.zeros(()))
    assert trainer.progress.ss_replace == 1.0
    assert len(seen) == 2  # the teacher-forced pass, then the training pass
    assert torch.equal(seen[0], x)
    mixed = seen[1]
    assert torch.equal(mixed[:, 0], x[:, 0])
    assert (mixed[:, 1:] == favourite).all()
    assert (x[:, 1:] != favourite).any()  # the check can tell
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout random numbers were used up (dropout is 0 here)


def test_probability_one_uniform_feeds_random_symbols_without_an_extra_pass(tmp_path, prepared):
    model_cfg, cfg = small_configs(
        lr=1e-9, batch_size=16, scheduled_sampling="exponential", ss_k=1e-12, ss_floor=0.0, ss_mode="uniform"
    )
    trainer = Trainer(model_cfg, cfg, prepared, tmp_path / "run")
    trainer.step(torch.zeros(()))
    seen = _inputs_seen(trainer)
    x, _ = trainer.batcher.window(1)
    trainer.step(torch.zeros(()))
    assert trainer.progress.ss_replace == pytest.approx(1.0)
    assert len(seen) == 1  # no teacher-forced pass in uniform mode
    mixed, vocab = seen[0], model_cfg.vocab_size
    assert torch.equal(mixed[:, 0], x[:, 0])
    same = float((mixed[:, 1:] == x[:, 1:]).float().mean())
    assert same < 3 / vocab  # the true symbol only by chance (1/V expected); plain inputs would be 1.0
    assert len(torch.unique(mixed[:, 1:])) > vocab * 0.8  # spread over the vocabulary


def test_masks_depend_on_seed_rank_and_step_only():
    cfg = config.TrainConfig(scheduled_sampling="linear", ss_k=2.0, ss_floor=0.0, ss_mode="uniform", seed=3)
    x = torch.zeros(4, 16, dtype=torch.long)
    a = ScheduledSampler(cfg, 30, rank=0).inputs(None, x, None, 1)
    assert torch.equal(a, ScheduledSampler(cfg, 30, rank=0).inputs(None, x, None, 1))
    assert not torch.equal(a, ScheduledSampler(cfg, 30, rank=1).inputs(None, x, None, 1))
    assert not torch.equal(a, ScheduledSampler(cfg, 30, rank=0).inputs(None, x, None, 2))


@pytest.mark.parametrize("mode", ["model", "uniform"])
def test_exact_resume_with_the_schedule(tmp_path, prepared, mode):
    """N steps, stop, resume for N more == 2N straight; the checkpoint says what the schedule is and where it stands."""
    n = 6
    model_cfg, cfg = small_configs(
        max_steps=2 * n, log_every=1, scheduled_sampling="inverse-sigmoid", ss_k=2.0, ss_floor=0.1, ss_mode=mode
    )
    model_cfg.dropout = 0.2
    straight = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "straight")
    straight.run()
    asked = []
    first = Trainer(
        copy.deepcopy(model_cfg),
        copy.deepcopy(cfg),
        prepared,
        tmp_path / "split",
        report=lambda kind, r: asked.append("SIGINT") if kind == "train" and r["step"] == n else None,
        stop=lambda: asked[0] if asked else None,
    )
    with pytest.raises(TrainingStopped):
        first.run()
    last = checkpoint.load(tmp_path / "split" / "last.safetensors")
    state, train = last.meta["train_state"], last.meta["train"]
    assert state["ss_step"] == n and state["ss_replace"] == pytest.approx(1 - teacher_forcing(cfg, n - 1))
    assert (train["scheduled_sampling"], train["ss_k"], train["ss_floor"], train["ss_mode"]) == (
        "inverse-sigmoid",
        2.0,
        0.1,
        mode,
    )
    resumed = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "split", resume=last)
    assert resumed.progress.ss_step == n
    resumed.run()
    a, b = params(straight.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.progress.ss_step == 2 * n


def test_a_schedule_switched_on_at_resume_starts_at_its_beginning(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", text_file, "--out", out, "--max-steps", "4", "--eval-every", "4", *FAST).exit_code == 0
    assert checkpoint.read_meta(out / "last.safetensors")["train_state"].get("ss_step", 0) == 0
    r = run(
        "train",
        "--resume",
        out / "last.safetensors",
        "--max-steps",
        "7",
        "--scheduled-sampling",
        "linear",
        "--ss-k",
        "100",
        "--ss-floor",
        "0",
        "--ss-mode",
        "uniform",
    )
    assert r.exit_code == 0, r.output
    meta = checkpoint.read_meta(out / "last.safetensors")
    assert meta["train_state"]["step"] == 7 and meta["train_state"]["ss_step"] == 3
    assert meta["train_state"]["ss_replace"] == pytest.approx(0.02)
    assert meta["train"]["scheduled_sampling"] == "linear"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduled-sampling", "cosine"], "scheduled_sampling must be one of none, linear, exponential, inverse-sigmoid"),
        (["--scheduled-sampling", "exponential", "--ss-k", "1.5"], r"ss_k for exponential.*\(0, 1\).*1.5"),
        (["--scheduled-sampling", "linear", "--ss-k", "0.5"], r"ss_k for linear.*>= 1"),
        (["--scheduled-sampling", "inverse-sigmoid", "--ss-k", "-2"], "ss_k must be positive"),
        (["--ss-k", "nan"], "ss_k must be a finite number"),
        (["--ss-floor", "1.5"], r"ss_floor must be in \[0, 1\]"),
        (["--ss-mode", "argmax"], "ss_mode must be one of model, uniform"),
    ],
)
def test_bad_schedule_options_are_one_line_errors(tmp_path, text_file, flags, message):
    r = run("train", text_file, "--out", tmp_path / "run", "--max-steps", "2", *FAST, *flags)
    assert_clean_error(r, message)
    assert not (tmp_path / "run").exists()


def test_yaml_and_old_checkpoints_get_the_defaults():
    _, train = config.resolve({})
    assert (train.scheduled_sampling, train.ss_k, train.ss_floor, train.ss_mode) == ("none", None, 0.5, "model")
    with pytest.raises(CharlmError, match="ss_mode"):
        config.resolve({"ss_mode": "beam"})
