"""`charlm plot`: loss curves from metrics.jsonl as a PNG."""

import json
import sys

from typer.testing import CliRunner

from charlm.cli import app
from charlm.tools.plot import read_curves

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_metrics(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def fake_run(steps=60, every=20):
    records = []
    for step in range(10, steps + 1, 10):
        chars = step * 4096
        records.append({"kind": "train", "step": step, "chars_seen": chars, "train_bpc": 6.0 / (1 + step / 20), "lr": 0.003})
        if step % every == 0:
            records.append(
                {"kind": "val", "step": step, "chars_seen": chars, "val_bpc": 6.2 / (1 + step / 25), "best_val_bpc": 0.0}
            )
    return records


def test_plot_writes_a_png(tmp_path):
    run_dir = tmp_path / "shk-run"
    write_metrics(run_dir, fake_run())
    r = run("plot", run_dir)
    assert r.exit_code == 0, r.output
    png = run_dir / "loss.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    out = tmp_path / "figs" / "curve.png"
    r = run("plot", run_dir, "-o", out)
    assert r.exit_code == 0 and out.read_bytes().startswith(PNG_SIGNATURE)


def test_curves_from_a_resumed_run_and_a_cut_last_line(tmp_path):
    records = fake_run(60)
    # Resumed from the step-40 checkpoint: steps 50 and 60 are logged again, with other values.
    records += [{"kind": "train", "step": s, "chars_seen": s * 4096, "train_bpc": 1.0} for s in (50, 60)]
    write_metrics(tmp_path, records, tail='{"kind": "train", "st')
    curves = read_curves(tmp_path)
    assert [c for c, _ in curves["train"]] == [s * 4096 for s in range(10, 61, 10)]
    assert curves["train"][-1][1] == 1.0 and len(curves["val"]) == 3


def test_plot_errors(tmp_path, monkeypatch):
    assert run("plot", tmp_path / "missing").exit_code == 1
    r = run("plot", tmp_path)
    assert r.exit_code == 1 and "no metrics.jsonl" in r.stderr
    write_metrics(tmp_path, [{"kind": "saved", "step": 1}])
    r = run("plot", tmp_path)
    assert r.exit_code == 1 and "no train or val" in r.stderr
    write_metrics(tmp_path, fake_run())
    r = run("plot", tmp_path, "-o", tmp_path / "curve.svg")
    assert r.exit_code == 1 and ".png" in r.stderr
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run("plot", tmp_path)
    assert r.exit_code == 1 and "pip install matplotlib" in r.stderr
    assert "Traceback" not in r.output
