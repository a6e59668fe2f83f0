"""Install anywhere: the packaged registry, where the corpora dir is, --version, completion, --prime-file.

The wheel itself (built, installed into a fresh venv, used from an empty directory) is checked by
.ci/wheel_check.sh (`make wheel-check`), which CI runs after the tests.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest
from conftest import assert_clean_error, make_text, run

import charlm
from charlm.cli import main
from charlm.data import corpus

FAST = ["--rnn-size", "32", "--embed-size", "16", "--batch-size", "4", "--seq-length", "16", "--device", "cpu"]
SHIPPED = {"shakespeare", "paulgraham", "linux", "linux-core"}
PRIME = "the fox.\nthe dog jumps.\n\nover a "  # newlines, a blank line, a trailing space


def assert_usage_error(capsys, argv, pattern):
    """Through the real entry point (CliRunner skips main's handling): one line, exit 1."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines


# -- the registry ships in the package ---------------------------------------------------------
def test_packaged_registry_needs_no_yaml_in_the_corpora_dir(isolated_corpora):
    assert list(isolated_corpora.iterdir()) == []
    assert SHIPPED <= set(corpus.registry())
    assert corpus.lookup("shakespeare").sha256.startswith("86c4e6aa9db7")
    r = run("corpus", "list")
    assert r.exit_code == 0, r.output
    assert all(name in r.stdout for name in SHIPPED)
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line on stderr
    assert f"corpora dir: {isolated_corpora}" in " ".join(r.stderr.split())


def test_a_registry_file_in_the_corpora_dir_adds_or_replaces(isolated_corpora):
    (isolated_corpora / "toy.yaml").write_text("name: toy\ndescription: mine\nbytes: 3\nlicense: none\n")
    shipped = corpus.lookup("shakespeare")
    (isolated_corpora / "shakespeare.yaml").write_text(
        f"name: shakespeare\ndescription: my copy\nbytes: {shipped.bytes}\nsha256: {shipped.sha256}\nlicense: PD\n"
    )
    entries = corpus.registry()
    assert entries["toy"].description == "mine" and entries["shakespeare"].description == "my copy"
    assert entries["shakespeare"].url is None and SHIPPED <= set(entries)
    (isolated_corpora / "bad.yaml").write_text("name: [unclosed\n")
    assert_clean_error(run("corpus", "list"), r"registry file .*bad\.yaml is incomplete or malformed")


# -- where the corpora dir is ----------------------------------------------------------------
@pytest.fixture
def outside(tmp_path, monkeypatch):
    """No $CHARLM_CORPORA_DIR, an empty current dir, the package installed away from any checkout."""
    monkeypatch.delenv("CHARLM_CORPORA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    site = tmp_path / "site-packages" / "charlm"
    site.mkdir(parents=True)
    monkeypatch.setattr(charlm, "__file__", str(site / "__init__.py"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return empty


def test_outside_a_checkout_the_per_user_data_dir(outside, tmp_path):
    expected = Path(platformdirs.user_data_dir("charlm")) / "corpora"
    assert corpus.corpora_dir() == expected
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "data" / "charlm" / "corpora"
    r = run("corpus", "list")
    assert r.exit_code == 0 and "shakespeare" in r.stdout, r.output
    assert "per-user data dir" in r.stderr and list(outside.iterdir()) == []


def test_checkouts_and_a_corpora_dir_win_over_the_user_dir(outside, tmp_path, monkeypatch):
    (outside / "pyproject.toml").write_text('[project]\nname = "not-charlm"\n')
    assert corpus.corpora_dir() == Path(platformdirs.user_data_dir("charlm")) / "corpora"
    (outside / "corpora").mkdir()  # ./corpora exists: that is the place
    assert corpus.corpora_dir() == outside / "corpora"
    checkout = tmp_path / "checkout"
    (checkout / "charlm").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "charlm"\nversion = "1"\n')
    monkeypatch.chdir(checkout)  # the current dir is a charlm checkout
    assert corpus.corpora_dir() == checkout / "corpora"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # elsewhere, with an editable install of that checkout
    monkeypatch.setattr(charlm, "__file__", str(checkout / "charlm" / "__init__.py"))
    assert corpus.corpora_location() == (checkout / "corpora", "the checkout charlm runs from")
    monkeypatch.setenv("CHARLM_CORPORA_DIR", str(tmp_path / "env"))  # the variable beats them all
    assert corpus.corpora_dir() == tmp_path / "env"


def test_the_corpora_dir_flag(outside, tmp_path, capsys):
    content = make_text(2000).encode()
    mine = tmp_path / "mine"
    mine.mkdir()
    import hashlib

    (mine / "toy.yaml").write_text(
        f"name: toy\ndescription: t\nbytes: {len(content)}\nsha256: {hashlib.sha256(content).hexdigest()}\nlicense: none\n"
    )
    (tmp_path / "mirror" / "toy").mkdir(parents=True)
    (tmp_path / "mirror" / "toy" / "input.txt").write_bytes(content)
    r = run("--corpora-dir", mine, "corpus", "list")
    assert r.exit_code == 0 and "toy" in r.stdout, r.output
    assert f"corpora dir: {mine} (from --corpora-dir" in " ".join(r.stderr.split())
    r = run("--corpora-dir", mine, "corpus", "get", "toy", "--mirror", tmp_path / "mirror")
    assert r.exit_code == 0, r.output
    assert (mine / "toy" / "input.txt").read_bytes() == content and list(outside.iterdir()) == []
    assert_usage_error(capsys, ["--corpora-dir"], "requires an argument")


# -- --version, --help, completion -----------------------------------------------------------
def test_version_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "charlm", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"charlm {re.escape(charlm.__version__)} \(torch \S+\)\n", r.stdout), r.stdout


def test_help_and_completion_options(capsys):
    r = run("--help")
    assert r.exit_code == 0
    for flag in ("--version", "--corpora-dir", "--install-completion", "--show-completion"):
        assert flag in r.stdout
    # In a real process, with the shell named: typer otherwise detects it from the parent processes
    # (shellingham), which fails under `timeout` or make, as CI runs the suite.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run([sys.executable, "-m", "charlm", "--show-completion", "bash"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "complete" in r.stdout, r.stderr
    assert_usage_error(capsys, ["--no-such-flag"], "No such option")


# -- --prime-file ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-step model trained from a prepared dir (no corpus cache involved), shared by the module."""
    root = tmp_path_factory.mktemp("prime")
    text = root / "tiny.txt"
    text.write_text(make_text())
    assert run("prepare", text, "-o", root / "p").exit_code == 0
    r = run("train", root / "p", "--out", root / "run", "--max-steps", "3", *FAST)
    assert r.exit_code == 0, r.output
    return root / "run" / "best.safetensors"


def test_prime_file_with_newlines(tiny_model, tmp_path):
    prime = tmp_path / "prime.txt"
    prime.write_text(PRIME, encoding="utf-8")
    r = run("sample", tiny_model, "--prime-file", prime, "--length", "20", "--seed", "2")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(PRIME) and len(r.stdout) == len(PRIME) + 20 + 1
    assert r.stdout == run("sample", tiny_model, "--prime", PRIME, "--length", "20", "--seed", "2").stdout
    r = run("beam", tiny_model, "--prime-file", prime, "--length", "10", "--beam-width", "2", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["text"].startswith(PRIME)
    assert rows == json.loads(run("beam", tiny_model, "--prime", PRIME, "--length", "10", "--beam-width", "2", "--json").stdout)


@pytest.mark.parametrize("command", ["sample", "beam"])
def test_prime_file_errors(tiny_model, tmp_path, command):
    good = tmp_path / "good.txt"
    good.write_text("the ")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1"))
    assert_clean_error(run(command, tiny_model, "--prime", "the", "--prime-file", good), "either --prime .* not both")
    assert_clean_error(run(command, tiny_model, "--prime-file", tmp_path / "nope.txt"), "nope.txt does not exist")
    assert_clean_error(run(command, tiny_model, "--prime-file", tmp_path), "is a directory")
    assert_clean_error(
        run(command, tiny_model, "--prime-file", bad), r"latin1.txt is not UTF-8 text \(invalid byte at offset 3\)"
    )
