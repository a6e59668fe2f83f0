"""Data-parallel training on CPU (DDP over Gloo, 2 ranks): exact against one process, failures, resume."""

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import small_configs
from typer.testing import CliRunner

from charlm import CharlmError, checkpoint
from charlm.cli import app
from charlm.data import PreparedData, StreamBatcher, eval_windows, row_span
from charlm.training.distributed import World, live_group_threads, pick_backend
from charlm.training.trainer import Trainer

B, K = 4, 6  # per-rank batch; steps per phase
FAST = ["--rnn-size", "32", "--embed-size", "16", "--batch-size", str(B), "--seq-length", "16", "--device", "cpu"]
HOOK = """
    # Loaded at start-up by every process of the run (PYTHONPATH). CHARLM_TEST_HOOK raise or nan: breaks rank 1 after step 7.
    import os
    if os.environ.get("RANK") == "1" and os.environ.get("CHARLM_TEST_HOOK") in ("raise", "nan"):
        import torch
        from charlm.training.trainer import Trainer

        original = Trainer.step

        def step(self, loss_sum):
            original(self, loss_sum)
            if self.progress.step == 7:
                if os.environ["CHARLM_TEST_HOOK"] == "raise":
                    raise RuntimeError("injected failure")
                with torch.no_grad():
                    self.model.head.bias.fill_(float("nan"))  # rank 1 only

        Trainer.step = step
    # The exit timing perturbed: this rank leaves the process group (and the process) a second late.
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("CHARLM_TEST_EXIT_DELAY_RANK"):
        import time
        from charlm.training.distributed import World

        leave = World.close

        def close(self):
            time.sleep(1.0)
            leave(self)

        World.close = close
"""


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Every process of these tests (ranks inherit the environment) on one thread: the figures compared
    are then the same whatever else runs on the machine (charlm/threads.py would follow the free cores)."""
    monkeypatch.setenv("CHARLM_THREADS", "1")


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, data_dir, out, results, cell="lstm", late_rank=None):
    """One of two ranks: K steps, validate, then resume the 2-rank checkpoint for K more. `late_rank`
    leaves the process group a second after the other (the exit timing perturbed)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        CHARLM_THREADS="1",
    )
    from charlm.training import distributed

    world = distributed.setup(torch.device("cpu"), "gloo")
    try:
        data = PreparedData(data_dir)
        model_cfg, cfg = small_configs(cell, batch_size=B, max_steps=K, eval_every=K, log_every=2)
        first = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), data, out, world=world)
        first.run()
        world.barrier()  # rank 0 has written last.safetensors
        val = first.validate()
        cfg.max_steps = 2 * K
        second = Trainer(model_cfg, cfg, data, out, resume=checkpoint.load(out / "last.safetensors"), world=world)
        second.run()
        result = {"first": params(first.model), "val": val, "second": params(second.model), "threads": torch.get_num_threads()}
        if rank == late_rank:
            time.sleep(1.0)
    finally:
        world.close()
    # Nothing of the group may outlive close(): a Gloo thread still running at interpreter exit is what
    # aborted a rank now and then ("terminate called without an active exception"; distributed.py).
    result["threads_after_close"] = live_group_threads()
    torch.save(result, results / f"rank{rank}.pt")


def spawn_two(fn, args, timeout=60):
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout}s")


# lstm (fused kernels) and the two new training paths: the peephole kernel's own backward, the minimal cells' scan
@pytest.mark.parametrize("cell", ["lstm", "peephole", "minlstm"])
def test_two_ranks_equal_one_process_with_both_batches(tmp_path, prepared, cell):
    """2 ranks x B == 1 process x 2B over the same rows: weights, validation figure, and a resume that splits the state."""
    results = tmp_path / "results"
    results.mkdir()
    spawn_two(_rank_main, (free_port(), str(prepared.dir), tmp_path / "ddp", results, cell))
    r0, r1 = torch.load(results / "rank0.pt"), torch.load(results / "rank1.pt")

    model_cfg, cfg = small_configs(cell, batch_size=2 * B, max_steps=K, eval_every=K, log_every=2)
    single = Trainer(copy.deepcopy(model_cfg), copy.deepcopy(cfg), prepared, tmp_path / "single")
    single.run()
    cfg.max_steps = 2 * K
    straight = Trainer(model_cfg, cfg, prepared, tmp_path / "straight")
    straight.run()

    expected = params(single.model)
    for name, value in expected.items():
        assert torch.equal(r0["first"][name], r1["first"][name]), f"ranks differ in {name}"
        torch.testing.assert_close(r0["first"][name], value, atol=1e-5, rtol=0)
    assert r0["val"] == r1["val"] == pytest.approx(single.validate(), rel=1e-6)
    # The 2-rank checkpoint carries every row's state; resumed on 2 ranks, each takes its rows back.
    for name, value in params(straight.model).items():
        assert torch.equal(r0["second"][name], r1["second"][name])
        torch.testing.assert_close(r0["second"][name], value, atol=1e-5, rtol=0)
    # Guard: the weights moved well beyond the tolerance, so a wrong row or state would show.
    assert max((expected[k] - params(straight.model)[k]).abs().max() for k in expected) > 1e-3
    assert r0["threads"] == r1["threads"] == 1  # CHARLM_THREADS
    assert r0["threads_after_close"] == r1["threads_after_close"] == []


@pytest.mark.parametrize("late_rank", [0, 1])
def test_every_rank_exits_cleanly_whichever_leaves_last(tmp_path, prepared, late_rank):
    """The exit timing perturbed: one rank leaves the group a second after the other. Both exit with
    code 0 (spawn_two fails on a signal or a non-zero exit), and no Gloo or store thread survives close()."""
    results = tmp_path / "results"
    results.mkdir()
    spawn_two(_rank_main, (free_port(), str(prepared.dir), tmp_path / "ddp", results, "lstm", late_rank))
    for rank in (0, 1):
        assert torch.load(results / f"rank{rank}.pt")["threads_after_close"] == []


def run_cli(args, tmp_path, hook=None, timeout=90):
    env = dict(os.environ)
    if hook:
        (tmp_path / "hook").mkdir()
        (tmp_path / "hook" / "sitecustomize.py").write_text(textwrap.dedent(HOOK))
        env.update(PYTHONPATH=str(tmp_path / "hook"), CHARLM_TEST_HOOK=hook)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "charlm", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    return proc, time.monotonic() - start


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "hook, message", [("raise", r"rank 1: RuntimeError: injected failure"), ("nan", r"loss became nan by step 8.*intact")]
)
def test_a_failing_rank_stops_the_run(tmp_path, text_file, hook, message):
    """An exception or a NaN on rank 1 only: every rank stops, one error line, exit 1; the last checkpoint survives."""
    out = tmp_path / "run"
    proc, seconds = run_cli(
        ["train", text_file, "--out", out, "--nproc", "2", "--max-steps", "200", "--eval-every", "5", "--log-every", "4", *FAST],
        tmp_path,
        hook=hook,
    )
    assert proc.returncode == 1, proc.stderr
    assert seconds < 60
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr and "exitcode" not in proc.stderr  # no torchrun report either
    last = checkpoint.load(out / "last.safetensors")
    assert last.meta["train_state"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in last.model_state().values())


def test_two_rank_checkpoint_resumes_in_one_process_and_samples(tmp_path, text_file, isolated_corpora, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("CHARLM_TEST_EXIT_DELAY_RANK", "0")  # rank 0 (the store's host) leaves a second after rank 1
    proc, _ = run_cli(
        ["train", text_file, "--out", out, "--nproc", "2", "--max-steps", "10", "--eval-every", "10", *FAST],
        tmp_path,
        hook="exit-delay",
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: step 10" in proc.stderr and not error_lines(proc.stderr)
    assert "terminate called" not in proc.stderr
    last = checkpoint.load(out / "last.safetensors")
    # Same format as one process: plain key names, and the carried state of all 2 x B rows.
    assert not any(k.startswith("module.") for k in last.model_state())
    assert last.train_tensors()["hidden.0"].shape == (2, 2 * B, 32)
    assert last.meta["provenance"]["world_size"] == 2 and last.meta["train"]["batch_size"] == B
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [10]  # rank 0 alone wrote it

    # One process with the same 2B rows continues every row's state; with B rows they restart from zero.
    data = PreparedData(last.meta["provenance"]["data_dir"])
    model_cfg, cfg = small_configs(batch_size=2 * B, max_steps=20)
    same_rows = Trainer(model_cfg, cfg, data, tmp_path / "a", resume=last)
    assert torch.equal(same_rows.state[0], last.train_tensors()["hidden.0"])
    model_cfg, cfg = small_configs(batch_size=B, max_steps=20)
    fewer_rows = Trainer(model_cfg, cfg, data, tmp_path / "b", resume=last)
    assert fewer_rows.state is None and fewer_rows.progress.window == 2 * 10  # same fraction of the epoch

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--resume", str(out / "last.safetensors"), "--max-steps", "14", "--log-every", "2"])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(out / "last.safetensors").meta["train_state"]["step"] == 14
    r = runner.invoke(app, ["sample", str(out / "last.safetensors"), "--length", "40", "--seed", "1", "--prime", "The "])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("The ") and len(r.stdout) == 4 + 40 + 1


def test_rank_rows_are_the_single_process_layout():
    """Rank r's batcher holds rows [rB, (r+1)B) of the 2B-row layout; val shares cover every stream once."""
    tokens = np.arange(1001, dtype=np.uint16)
    full = StreamBatcher(tokens, 2 * B, 10)
    parts = [StreamBatcher(tokens, 2 * B, 10, rows=World(size=2, rank=r).rows(B)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(full)  # equal shards: no rank waits for another
    for k in range(len(full)):
        for i in (0, 1):  # inputs and targets
            assert torch.equal(torch.cat([p.window(k)[i] for p in parts]), full.window(k)[i])
    streams = 5  # not a multiple of the ranks: shares of 2 and 3 streams
    shares = [World(size=2, rank=r).share(streams) for r in range(2)]
    assert shares == [(0, 2), (2, 5)]
    whole = [y for _, y in eval_windows(tokens, streams, 16)]
    split = [[y for _, y in eval_windows(row_span(tokens, streams, lo, hi), hi - lo, 16)] for lo, hi in shares]
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*split, whole))
    assert World(size=4, rank=0).share(2) == (0, 0)  # more ranks than streams: some score nothing


def test_backend_choice():
    assert pick_backend(torch.device("cpu")) == "gloo"
    assert pick_backend(torch.device("cuda")) == "nccl"
    assert pick_backend(torch.device("cuda"), "gloo") == "gloo"
    with pytest.raises(CharlmError, match="nccl needs CUDA"):
        pick_backend(torch.device("cpu"), "nccl")
    with pytest.raises(CharlmError, match="--backend must be one of"):
        pick_backend(torch.device("cpu"), "mpi")
