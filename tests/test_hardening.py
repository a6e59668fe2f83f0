"""Hardening: what must work (or end in one clean line) in odd environments and under signals.

Locales that cannot encode the text (an escaped rendering, never a traceback); arguments and file
names that are not UTF-8; a reader that closes the pipe (every stdout writer ends within 5 s, silent,
exit 141; training saves first); Ctrl-C while the program starts (130, one line); SIGTERM and SIGHUP
during `corpus get` and `prepare` (partial files removed, one line); a deleted working directory;
the page's mode from the umask; one BOM rule; long names; full disks. The error rows (exit 1, one
line, files unchanged) are in test_bad_input.py; the run-dir lock in test_concurrency.py.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, make_text, run

from charlm import CharlmError, checkpoint
from charlm.cli import ranks
from charlm.training import rundir

TEXT = make_text(12000, seed=1) + "Señor Ñandú: ¿qué tal? café, naïve, jalapeño.\n" * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny run trained on a text with non-ASCII characters: ROOT/run/{best,last}.safetensors."""
    root = tmp_path_factory.mktemp("hardening")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CORPORA_DIR", str(root / "corpora"))
        (root / "text.txt").write_text(TEXT)
        r = run("train", root / "text.txt", "--out", root / "run", *FAST, "--max-steps", "4", "--eval-every", "2")
        assert r.exit_code == 0, r.output
    return root / "run"


def charlm(*args, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m charlm.entry ARGS` (the console script's entry point) in a process of its own."""
    full = {**os.environ, "CHARLM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "charlm.entry", *map(str, args)], capture_output=True, env=full, timeout=timeout, **kw
    )


def text_of(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert b"Traceback" not in r.stdout + r.stderr, text_of(r.stderr)


ASCII = {"PYTHONIOENCODING": "ascii"}
POSIX = {"PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "POSIX", "LANG": "", "PYTHONIOENCODING": ""}


# -- locales -------------------------------------------------------------------------------------


@pytest.mark.parametrize("locale", [ASCII, POSIX], ids=["PYTHONIOENCODING=ascii", "LC_ALL=POSIX"])
@pytest.mark.parametrize("command", ["sample", "beam", "beam-json"])
def test_text_the_locale_cannot_encode_is_escaped(model, locale, command):
    prime = "Señor Ñandú: "
    args = {
        "sample": ["sample", model / "best.safetensors", "--prime", prime, "--length", "30", "--seed", "1"],
        "beam": ["beam", model / "best.safetensors", "--prime", prime, "--length", "10", "--n-best", "2"],
        "beam-json": ["beam", model / "best.safetensors", "--prime", prime, "--length", "10", "--json"],
    }[command]
    r = charlm(*args, env=locale)
    no_traceback(r)
    assert r.returncode == 0, text_of(r.stderr)
    assert r.stdout.isascii()
    if command == "beam-json":  # JSON is written ASCII-only (\u escapes): the same text for any reader
        assert json.loads(r.stdout)[0]["text"].startswith(prime)
    else:
        assert r.stdout.startswith(b"Se\\xf1or \\xd1and\\xfa: ")  # the documented escaped rendering


@pytest.mark.parametrize("locale", [ASCII, POSIX], ids=["PYTHONIOENCODING=ascii", "LC_ALL=POSIX"])
@pytest.mark.parametrize("command", ["eval", "info", "info-json"])
def test_tables_and_json_survive_any_locale(model, locale, command):
    ckpt = model / "best.safetensors"
    args = {"eval": ["eval", ckpt], "info": ["info", ckpt], "info-json": ["info", ckpt, "--json"]}[command]
    r = charlm(*args, env=locale)
    no_traceback(r)
    assert r.returncode == 0 and r.stdout.isascii(), text_of(r.stderr)
    if command == "info-json":
        assert "ñ" in json.loads(r.stdout)["vocab"]["chars"]


def test_utf8_typed_under_a_posix_locale_is_still_utf8(model):
    """The bytes of 'ñ' reach Python as surrogate escapes under LC_ALL=POSIX; the prime is still 'ñ'."""
    args = ["sample", model / "best.safetensors", "--prime", "ñ", "--length", "20", "--greedy"]
    posix, utf8 = charlm(*args, env=POSIX), charlm(*args)
    assert posix.returncode == 0 and utf8.returncode == 0, text_of(posix.stderr + utf8.stderr)
    assert posix.stdout == utf8.stdout.decode("utf-8").encode("ascii", "backslashreplace")


# -- file names that are not UTF-8 ----------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_data(tmp_path, isolated_corpora):
    odd = os.fsdecode(b"t\xfd.txt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / odd).write_text(TEXT)
    (tmp_path / "data" / "plain.txt").write_text(TEXT)
    r = charlm("prepare", tmp_path / "data" / odd, "-o", tmp_path / "p1")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, text_of(r.stderr)
    meta = json.loads((tmp_path / "p1" / "meta.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON
    assert meta["source"]["paths"] == [str((tmp_path / "data" / odd).resolve())]  # read back as the same path
    r = charlm("prepare", tmp_path / "data", "-o", tmp_path / "p2")  # a directory holding such a file
    assert r.returncode == 0, text_of(r.stderr)
    out = tmp_path / os.fsdecode(b"run\xfd")
    r = charlm("train", tmp_path / "data" / odd, "--out", out, *FAST, "--max-steps", "2")
    assert r.returncode == 0, text_of(r.stderr)
    assert b"run\\xfd" in r.stderr  # shown escaped
    assert checkpoint.load(out / "last.safetensors").meta["provenance"]["source_paths"] == [
        str((tmp_path / "data" / odd).resolve())
    ]


# -- broken pipes ---------------------------------------------------------------------------------

STREAMING = {  # commands whose output outlasts the pipe's buffer: read some, close, time the end
    "sample": ["sample", "{ckpt}", "--length", "100000000", "--seed", "1"],
    "sample-num-samples": ["sample", "{ckpt}", "--length", "100000000", "--num-samples", "3", "--seed", "1"],
}
SHORT = {  # commands with a short output: the reader is gone before it is written
    "sample-short": ["sample", "{ckpt}", "--length", "50", "--num-samples", "3"],
    "beam": ["beam", "{ckpt}", "--length", "20"],
    "beam-n-best": ["beam", "{ckpt}", "--length", "20", "--beam-width", "4", "--n-best", "3"],
    "beam-json": ["beam", "{ckpt}", "--length", "20", "--json"],
    "eval": ["eval", "{ckpt}"],
    "eval-json": ["eval", "{ckpt}", "--json"],
    "eval-dynamic-json": ["eval", "{ckpt}", "--dynamic", "--json"],
    "info": ["info", "{ckpt}"],
    "info-json": ["info", "{ckpt}", "--json"],
    "corpus-list": ["corpus", "list"],
    "viz-json": ["viz", "{ckpt}", "--text", "{text}", "-o", "{tmp}/page.html", "--json"],
    "version": ["--version"],
    "help": ["sample", "--help"],
}


def _argv(template: list[str], model: Path, tmp_path: Path) -> list[str]:
    values = {"ckpt": str(model / "last.safetensors"), "text": str(model.parent / "text.txt"), "tmp": str(tmp_path)}
    return [a.format(**values) for a in template]


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CHARLM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "charlm.entry", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


@pytest.mark.parametrize("case", list(STREAMING))
def test_a_streaming_writer_stops_within_5_s_of_its_reader(model, tmp_path, case):
    proc = _spawn(_argv(STREAMING[case], model, tmp_path))
    try:
        assert proc.stdout.read(100)  # it streams: text arrives while it runs
        proc.stdout.close()
        closed = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - closed < 5
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 141, text_of(err)
    assert b"error" not in err and b"Traceback" not in err  # silent (the sample header, on stderr, may be there)


@pytest.mark.parametrize("case", list(SHORT))
def test_every_stdout_writer_is_silent_at_a_broken_pipe(model, tmp_path, case):
    proc = _spawn(_argv(SHORT[case], model, tmp_path))
    proc.stdout.close()  # the reader is gone before the first byte
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 141, text_of(err)
    assert b"error" not in err.lower() and b"Traceback" not in err, text_of(err)


def test_training_whose_log_reader_goes_away_saves_at_that_step(tmp_path, prepared):
    out = tmp_path / "run"
    script = (
        f'"{sys.executable}" -m charlm.entry train "{prepared.dir}" --out "{out}" {" ".join(FAST)} --max-steps 100000 '
        '--log-every 3 --eval-every 100000 2>&1 | head -3; echo "code=${PIPESTATUS[0]}"'
    )
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=300, env={**os.environ, "CHARLM_THREADS": "1"}
    )
    assert r.stdout.strip().splitlines()[-1] == "code=141", r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = checkpoint.read_meta(out / "last.safetensors")["train_state"]["step"]
    assert saved == records[-1]["step"] and saved % 3 == 0  # the logging step whose report found the pipe closed
    assert not (out / ".charlm-run.lock").exists()


# -- signals ----------------------------------------------------------------------------------------


def test_ctrl_c_while_the_command_line_is_imported_is_one_line_and_130():
    """Deterministic: the import of charlm.cli raises KeyboardInterrupt, as a Ctrl-C there does."""
    probe = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'charlm.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from charlm.entry import main\n"
        "sys.argv = ['charlm', 'info', 'x']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "error: interrupted\n", r.stderr


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2, 1.5, 1.8])
def test_ctrl_c_during_start_up_never_prints_a_traceback(model, delay):
    env = {**os.environ, "CHARLM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm.entry", "info", str(model / "best.safetensors")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, text_of(err)
    if proc.returncode != 0:  # it may have finished first
        assert proc.returncode == 130 and err.strip().splitlines() == [b"error: interrupted"], text_of(err)


def test_sigterm_during_prepare_removes_the_work_dir(tmp_path):
    big = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog, señor.\n"
    big.write_text(line * (100_000_000 // len(line)))
    out = tmp_path / "p"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm.entry", "prepare", str(big), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CHARLM_THREADS": "1"},
    )
    end = time.monotonic() + 120
    while not list(tmp_path.glob(".p.building-*")) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, text_of(err)
    assert err.decode().strip().splitlines() == ["error: prepare stopped by SIGTERM; nothing half-written was left behind"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "corpora") == ["big.txt"]  # no work dir, no OUT


class _Stalling(http.server.BaseHTTPRequestHandler):
    """A download that sends a little and then stalls (until the test ends)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(50_000_000))
        self.end_headers()
        self.wfile.write(b"x" * 100_000)
        self.wfile.flush()
        self.server.release.wait(60)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_corpus_get_removes_the_partial_download(isolated_corpora, signame):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    server.release = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (isolated_corpora / "slow.yaml").write_text(
            f"name: slow\ndescription: a download that stalls\nbytes: 50000000\nlicense: none\n"
            f"url: http://127.0.0.1:{server.server_address[1]}/input.txt\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "charlm.entry", "corpus", "get", "slow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "CHARLM_THREADS": "1"},
        )
        end = time.monotonic() + 60
        while not list((isolated_corpora / "slow").glob(".input.txt.part-*")) and time.monotonic() < end:
            assert proc.poll() is None, text_of(proc.stderr.read())
            time.sleep(0.02)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        server.release.set()
        server.shutdown()
    assert proc.returncode == 1
    assert err.decode().strip().splitlines() == [f"error: corpus get stopped by {signame}; nothing half-written was left behind"]
    assert list((isolated_corpora / "slow").iterdir()) == []


def test_a_later_get_removes_the_partial_files_of_a_killed_one(isolated_corpora, tmp_path):
    """A fetch killed with -9 cannot clean up: the next one removes its temp file (its pid is gone), never a live one's."""
    mirror = tmp_path / "mirror" / "small"
    mirror.mkdir(parents=True)
    (mirror / "input.txt").write_text("hello\n" * 100)
    (isolated_corpora / "small.yaml").write_text("name: small\ndescription: d\nbytes: 600\nlicense: none\n")
    dest = isolated_corpora / "small"
    dest.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = dest / f".input.txt.part-{dead.pid}.abcd1234"
    live = dest / f".input.txt.part-{os.getpid()}.efgh5678"
    stale.write_text("partial")
    live.write_text("partial")
    r = run("corpus", "get", "small", "--mirror", tmp_path / "mirror")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists()
    assert (dest / "input.txt").read_text() == "hello\n" * 100


def test_a_deleted_working_directory_is_one_line(tmp_path, model):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m charlm info "{model / "best.safetensors"}"'
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: the current directory no longer exists (it was deleted or moved away); cd to a directory that exists"
    ]


# -- smaller items ------------------------------------------------------------------------------------


def test_the_viz_page_mode_follows_the_umask(model, tmp_path):
    old = os.umask(0o077)
    try:
        r = run(
            "viz",
            model / "best.safetensors",
            "--text",
            model.parent / "text.txt",
            "-o",
            tmp_path / "page.html",
            "--max-chars",
            "300",
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "page.html").stat().st_mode) == 0o600  # the page holds the text


def test_one_bom_rule_a_leading_bom_is_not_text(tmp_path, model):
    body = "The lazy dog.\nSeñor fox.\n" * 50
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "plain.txt").write_text(body)
    for name in ("bom", "plain"):
        assert run("prepare", tmp_path / f"{name}.txt", "-o", tmp_path / f"p-{name}").exit_code == 0
    metas = [json.loads((tmp_path / f"p-{n}" / "meta.json").read_text()) for n in ("bom", "plain")]
    assert metas[0]["vocab"] == metas[1]["vocab"] and "\ufeff" not in metas[0]["vocab"]["chars"]
    assert metas[0]["splits"] == metas[1]["splits"]
    scores = [run("eval", model / "best.safetensors", "--text", tmp_path / f"{n}.txt", "--json") for n in ("bom", "plain")]
    assert all(s.exit_code == 0 for s in scores), scores[0].output
    assert json.loads(scores[0].stdout)["bits_per_char"] == json.loads(scores[1].stdout)["bits_per_char"]


def test_long_but_legal_names_work(tmp_path, model):
    long_out = tmp_path / ("o" * 240)
    assert run("prepare", model.parent / "text.txt", "-o", long_out).exit_code == 0
    assert (long_out / "meta.json").exists()
    long_text = tmp_path / ("t" * 250)
    long_text.write_text(TEXT)
    r = run("train", long_text, "--out", tmp_path / ("r" * 240), *FAST, "--max-steps", "2")
    assert r.exit_code == 0, r.output
    r = run(
        "viz", model / "best.safetensors", "--text", model.parent / "text.txt", "-o", tmp_path / ("v" * 250), "--max-chars", "200"
    )
    assert r.exit_code == 0, r.output


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_one(trained, monkeypatch):
    ckpt = checkpoint.load(trained / "last.safetensors")
    before = (trained / "last.safetensors").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CharlmError) as e:
        checkpoint.save(trained / "last.safetensors", ckpt.build_model(), ckpt.meta, ckpt.train_tensors(), vocab=ckpt.vocab)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(e.value) == (
        f"no space left on the device holding {trained / 'last.safetensors'}; free space or choose "
        "another --out; the previous checkpoint is intact"
    )
    assert (trained / "last.safetensors").read_bytes() == before
    assert not [p for p in trained.iterdir() if p.name.endswith(".part")]


def test_a_full_disk_for_the_metrics_names_the_file(tmp_path):
    (tmp_path / rundir.METRICS).symlink_to("/dev/full")
    with pytest.raises(
        CharlmError, match=r"no space left on the device holding .*metrics\.jsonl; free space or choose another --out"
    ):
        rundir.append_record(tmp_path, {"kind": "train", "step": 1})


def test_nproc_is_checked_against_the_machine(monkeypatch):
    from charlm.config import ModelConfig, TrainConfig

    model_cfg, train_cfg = ModelConfig(num_layers=2, rnn_size=512, embed_size=64), TrainConfig(batch_size=32, seq_length=128)
    monkeypatch.setattr(ranks, "available_memory", lambda: 6 << 30)
    per_rank = ranks.rank_bytes(model_cfg, train_cfg, 100)
    assert 400 << 20 < per_rank < 1 << 30
    with pytest.raises(CharlmError, match=r"--nproc 64: the ranks would need about .* GB of memory .* use --nproc \d+ or fewer"):
        ranks.check_nproc(64, model_cfg, train_cfg, 100)
    monkeypatch.setattr(ranks, "available_memory", lambda: None)
    cores = os.cpu_count() or 1
    assert any("more than the" in w for w in ranks.check_nproc(cores + 1000, model_cfg, train_cfg, 100))
