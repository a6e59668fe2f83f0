"""charlm.prepare and charlm.train from Python: a progress callback, a stop from the caller, the result's files."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import make_text

from charlm import OptionError, checkpoint
from charlm.api.training import Progress, TrainResult, prepare, train

SMALL = dict(rnn_size=32, embed_size=16, batch_size=4, seq_length=16, device="cpu", log_every=1, eval_every=2)


def test_train_reports_progress_stops_when_asked_and_returns_its_files(tmp_path, text_file):
    seen: list[Progress] = []
    asked = threading.Event()

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.kind == "train" and p.step == 5:
            asked.set()

    result = train(text_file, tmp_path / "run", progress=progress, stop=asked, max_steps=1000, **SMALL)
    assert isinstance(result, TrainResult)
    assert result.step == 5 and result.stopped and "stopped by request at step 5" in result.stopped
    assert "--resume" in result.stopped
    kinds = [p.kind for p in seen]
    assert kinds[0] == "prepare" and kinds[kinds.count("prepare")] == "start"  # the text is prepared (and cached) first
    assert kinds.count("train") == 5 and "val" in kinds and "saved" in kinds
    assert [p.step for p in seen if p.kind == "train"] == [1, 2, 3, 4, 5]
    assert all(p.train_bpc is not None and p.train_bpc > 0 for p in seen if p.kind == "train")
    assert next(p for p in seen if p.kind == "start").info["config"]["model"]["rnn_size"] == 32
    for path in (result.last, result.best, result.data_dir / "meta.json"):
        assert path is not None and path.exists()
    assert result.out_dir == tmp_path / "run" and result.best_val_bpc is not None and result.rank == 0
    last = checkpoint.load(result.last)
    assert last.meta["train_state"]["step"] == 5
    assert checkpoint.load(result.best).build_model().num_parameters() > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if json.loads(line)["kind"] == "train"] == [1, 2, 3, 4, 5]

    # Resumed with the same call: it continues from step 5 to its limit, and says nothing when silent.
    again = train(text_file, tmp_path / "run", resume="auto", progress=False, max_steps=8, **SMALL)
    assert again.step == 8 and again.stopped is None and again.val_bpc is not None and again.train_bpc is not None


def test_a_stop_callable_may_give_its_reason(tmp_path, text_file):
    calls = []

    def stop():
        calls.append(1)
        return "the notebook's button" if len(calls) >= 3 else None

    result = train(text_file, tmp_path / "run", progress=False, stop=stop, max_steps=50, **SMALL)
    assert result.stopped.startswith("stopped by the notebook's button at step") and result.step <= 3


def test_a_finished_run(tmp_path, text_file):
    result = train(str(text_file), tmp_path / "run", progress=False, max_steps=4, **SMALL)
    assert result.step == 4 and result.stopped is None and result.best.exists()
    assert result.epoch > 0 and result.elapsed_s > 0


def test_bad_keywords_and_values_are_option_errors_naming_them(tmp_path, text_file):
    with pytest.raises(OptionError, match="unknown option.*learning_rate"):
        train(text_file, tmp_path / "run", learning_rate=0.1)
    with pytest.raises(OptionError, match="did you mean rnn_size"):
        train(text_file, tmp_path / "run", rnn_sise=64)
    with pytest.raises(OptionError, match="dropout must be in"):
        train(text_file, tmp_path / "run", dropout=1.5)
    with pytest.raises(OptionError, match="progress must be"):
        train(text_file, tmp_path / "run", progress="yes", **SMALL)
    with pytest.raises(OptionError, match="stop must be"):
        train(text_file, tmp_path / "run", stop=3, **SMALL)
    assert not (tmp_path / "run").exists()  # nothing was claimed or written


def test_prepare_reports_its_passes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(5000))
    seen: list[Progress] = []
    out = prepare(text, tmp_path / "p", split="0.8,0.1,0.1", progress=seen.append)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split_fractions"] == [0.8, 0.1, 0.1] and meta["source"]["chars"] == 5000
    assert seen and all(p.kind == "prepare" and p.phase and p.total == 5000 for p in seen)
    assert prepare(text, tmp_path / "q", split=(0.9, 0.1, 0.0), progress=False) == tmp_path / "q"
