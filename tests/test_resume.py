"""Resuming and re-running as users do: the same command with --resume, --resume auto, --overwrite,
--init-from of another shape, a metrics log that reads as one run, stop signals from outside."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, assert_clean_error, run, small_configs

from charlm import checkpoint
from charlm.cli import train as cli_train
from charlm.tools.plot import read_curves
from charlm.training.schedule import learning_rate
from charlm.training.trainer import Trainer


def digests(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def step_of(path: Path) -> int:
    return checkpoint.read_meta(path)["train_state"]["step"]


def test_the_same_command_with_resume_appended(tmp_path, text_file):
    out = tmp_path / "run"
    command = ["train", text_file, "--out", out, "--cell", "gru", "--max-steps", "10", "--eval-every", "5", *FAST]
    assert run(*command).exit_code == 0
    r = run(*command[: -len(FAST) - 2], "--max-steps", "20", *FAST, "--resume", out / "last.safetensors")
    assert r.exit_code == 0, r.output
    assert step_of(out / "last.safetensors") == 20


def test_resume_names_both_values_of_a_conflicting_flag(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", text_file, "--out", out, "--max-steps", "5", *FAST).exit_code == 0
    before = digests(out)
    last = out / "last.safetensors"
    assert_clean_error(
        run("train", "--resume", last, "--rnn-size", "64"), r"--rnn-size 64 \(the checkpoint has 32\).*--init-from"
    )
    assert_clean_error(run("train", "--resume", last, "--seed", "9"), r"--seed 9 \(the checkpoint has 1337\)")
    assert_clean_error(run("train", "--resume", last, "--init-from", last), "not both")
    assert digests(out) == before


def test_training_options_may_change_on_resume(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", text_file, "--out", out, "--max-steps", "6", "--eval-every", "3", *FAST).exit_code == 0
    r = run(
        "train",
        "--resume",
        out / "last.safetensors",
        "--max-steps",
        "12",
        "--lr",
        "0.0005",
        "--eval-every",
        "4",
        "--grad-clip",
        "1",
        "--dropout",
        "0.1",
        "--batch-size",
        "8",
    )
    assert r.exit_code == 0, r.output
    meta = checkpoint.read_meta(out / "last.safetensors")
    assert meta["train_state"]["step"] == 12
    assert (meta["train"]["lr"], meta["train"]["eval_every"], meta["train"]["batch_size"]) == (0.0005, 4, 8)


def test_resume_auto_starts_then_continues(tmp_path, text_file):
    out = tmp_path / "run"
    command = ["train", text_file, "--out", out, "--resume", "auto", "--eval-every", "4", *FAST]
    r = run(*command, "--max-steps", "4")
    assert r.exit_code == 0, r.output
    assert step_of(out / "last.safetensors") == 4
    r = run(*command, "--max-steps", "8")
    assert r.exit_code == 0, r.output
    assert step_of(out / "last.safetensors") == 8
    assert_clean_error(run("train", text_file, "--resume", "auto", *FAST), "--resume auto.*--out")


def test_init_from_another_shape_names_the_shapes(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", text_file, "--out", out, "--max-steps", "3", *FAST).exit_code == 0
    r = run(
        "train",
        text_file,
        "--out",
        tmp_path / "new",
        "--init-from",
        out / "best.safetensors",
        "--max-steps",
        "3",
        *FAST[2:],
        "--rnn-size",
        "48",
    )
    assert_clean_error(r, r"--init-from .*weights do not fit.*\(128, 16\) there, \(192, 16\) here")
    r = run(
        "train",
        text_file,
        "--out",
        tmp_path / "same",
        "--init-from",
        out / "best.safetensors",
        "--max-steps",
        "3",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--seq-length",
        "16",
    )
    assert r.exit_code == 0, r.output  # the checkpoint's own shape


def test_another_runs_out_dir_is_refused_unless_overwrite(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", text_file, "--out", out, "--max-steps", "4", "--eval-every", "2", *FAST).exit_code == 0
    before = digests(out)
    assert_clean_error(run("train", text_file, "--out", out, "--max-steps", "2", *FAST), "holds another run.*--overwrite")
    assert digests(out) == before
    r = run("train", text_file, "--out", out, "--max-steps", "2", "--eval-every", "2", "--overwrite", *FAST)
    assert r.exit_code == 0, r.output
    assert step_of(out / "last.safetensors") == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2  # the old run's records are gone, not mixed in


def test_resume_continues_the_metrics_log_after_a_kill(tmp_path, text_file):
    out = tmp_path / "run"
    assert (
        run("train", text_file, "--out", out, "--max-steps", "6", "--eval-every", "3", "--log-every", "1", *FAST).exit_code == 0
    )
    # As after kill -9 at step 8: the checkpoint says 6, the log went on to 8, its last line torn,
    # and a save was cut off mid-write.
    metrics = out / "metrics.jsonl"
    extra = [{"kind": "train", "step": s, "chars_seen": s * 64, "train_bpc": 9.0} for s in (7, 8)]
    metrics.write_text(metrics.read_text() + "".join(json.dumps(r) + "\n" for r in extra) + '{"kind": "tra')
    (out / ".last.safetensors.x1y2.part").write_bytes(b"half a checkpoint")
    r = run("train", "--resume", out / "last.safetensors", "--max-steps", "9", "--log-every", "1")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is JSON
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 10)) and all(r.get("train_bpc") != 9.0 for r in records)
    assert not list(out.glob(".*.part"))
    assert [c for c, _ in read_curves(out)["train"]][-1] > 0


def test_recorded_data_dir_is_checked_before_it_is_read(tmp_path, text_file, prepared):
    out = tmp_path / "run"
    model_cfg, cfg = small_configs(max_steps=3, eval_every=3)
    Trainer(model_cfg, cfg, prepared, out).run()
    last = out / "last.safetensors"
    ckpt = checkpoint.load(last)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("not training data " * 1000)
    for recorded, pattern in ((str(elsewhere), "not a prepared data dir"), ("/etc", "not a prepared data dir")):
        meta = {**ckpt.meta, "provenance": {**ckpt.meta["provenance"], "data_dir": recorded}}
        forged = tmp_path / "forged.safetensors"
        checkpoint.save(
            forged, Trainer(model_cfg, cfg, prepared, tmp_path / "x").model, meta, ckpt.train_tensors(), vocab=ckpt.vocab
        )
        assert_clean_error(run("train", "--resume", forged, "--max-steps", "5"), pattern)
    assert not (corpora_cache := Path(os.environ["CHARLM_CORPORA_DIR"]) / ".cache").exists() or not list(corpora_cache.iterdir())


def test_nproc_forwards_flags_as_the_user_wrote_them(tmp_path, text_file, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_train, "_launch_ranks", lambda n, args: seen.update(n=n, args=args))
    r = run("train", text_file, "--out", tmp_path / "run", "--nproc", "2", "--compile", "--max-steps", "3", *FAST)
    assert r.exit_code == 0, r.output
    args = seen["args"]
    assert seen["n"] == 2 and "--compile" in args and "True" not in args and "--nproc" not in args
    assert args[args.index("--max-steps") + 1] == "3"


def test_cosine_without_a_limit_decays_over_one_epoch(tmp_path, prepared):
    model_cfg, cfg = small_configs(schedule="cosine", min_lr_ratio=0.1)
    trainer = Trainer(model_cfg, cfg, prepared, tmp_path / "run")
    assert trainer.planned_steps() == len(trainer.batcher)
    trainer.run()
    assert trainer.progress.step == len(trainer.batcher) and trainer.progress.epoch == 1
    assert trainer._lr() == pytest.approx(learning_rate(cfg, trainer.progress.step, 1.0)) == pytest.approx(cfg.lr * 0.1)


@pytest.mark.parametrize(
    "signame, said", [("SIGINT", "interrupted"), ("SIGTERM", "stopped by SIGTERM"), ("SIGHUP", "stopped by SIGHUP")]
)
def test_stop_signals_save_and_exit_1(tmp_path, text_file, signame, said):
    """Ctrl-C, SIGTERM and SIGHUP to a real training process: the step finishes, last is saved, one line, exit 1."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "train",
            str(text_file),
            "--out",
            str(out),
            "--max-steps",
            "100000",
            "--log-every",
            "1",
            *FAST,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 200):
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"{said} at step" in lines[0] and "--resume" in lines[0], stderr
    assert "Traceback" not in stderr
    step = step_of(out / "last.safetensors")
    r = run("train", "--resume", out / "last.safetensors", "--max-steps", str(step + 2))
    assert r.exit_code == 0, r.output
    assert step_of(out / "last.safetensors") == step + 2
