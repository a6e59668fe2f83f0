"""The Python API gives exactly what the CLI gives: same checkpoints, settings and seed -> same text and figures.

Also: Streams stepped together equal the same streams run alone, stop strings, and the API's errors.
"""

from __future__ import annotations

import json
import threading

import pytest
from conftest import make_text, run, train_small

import charlm
from charlm.data import PreparedData


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained models on one prepared text (an LSTM and a GRU): last files (with optimizer state)."""
    from charlm.data import prepare as prep

    d = tmp_path_factory.mktemp("api")
    (d / "t.txt").write_text(make_text(20000))
    prep.prepare([d / "t.txt"], d / "prep")
    data = PreparedData(d / "prep")
    train_small(data, d / "a", max_steps=30)
    train_small(data, d / "b", cell="gru", max_steps=30)
    (d / "score.txt").write_text(make_text(3000, seed=7))
    return d


def paths(runs, n=1):
    return [runs / name / "last.safetensors" for name in ("a", "b")[:n]]


def load(runs, n=1):
    return charlm.load(*paths(runs, n), device="cpu", dtype="fp32")


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.8, "seed": 3},
        {"temperature": 1.3, "top_k": 5, "top_p": 0.9, "seed": 11},
        {"greedy": True},
    ],
)
def test_generate_equals_charlm_sample(runs, members, settings):
    lm = load(runs, members)
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
    result = run("sample", *paths(runs, members), "--prime", "The quick", "--length", 120, "--device", "cpu", *flags)
    assert result.exit_code == 0, result.output
    assert result.stdout == "The quick" + lm.generate("The quick", 120, **settings) + "\n"


def test_num_samples_are_generate_many_with_consecutive_seeds(runs):
    lm = load(runs)
    result = run("sample", *paths(runs), "--prime", "A", "--length", 60, "--num-samples", 3, "--seed", 40, "--device", "cpu")
    assert result.exit_code == 0, result.output
    many = lm.generate_many(["A"] * 3, 60, seed=40)
    assert result.stdout.splitlines() == [line for i in range(3) for line in ("A" + many[i]).splitlines()]
    assert many == [lm.generate("A", 60, seed=40 + i) for i in range(3)]


def test_stream_yields_the_generated_text(runs):
    lm = load(runs)
    pieces = list(lm.stream("The", 50, seed=5))
    assert len(pieces) == 50 and "".join(pieces) == lm.generate("The", 50, seed=5)


@pytest.mark.parametrize("members", [1, 2])
def test_beam_equals_charlm_beam(runs, members):
    lm = load(runs, members)
    result = run(
        "beam",
        *paths(runs, members),
        "--prime",
        "The",
        "--length",
        25,
        "--beam-width",
        4,
        "--n-best",
        3,
        "--json",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    beams = lm.beam("The", 25, beam_width=4, n_best=3)
    assert [r["text"] for r in rows] == ["The" + b.text for b in beams]
    assert [r["logprob"] for r in rows] == [b.logprob for b in beams]


@pytest.mark.parametrize("members", [1, 2])
def test_score_equals_charlm_eval(runs, members):
    lm = load(runs, members)
    result = run("eval", *paths(runs, members), "--text", runs / "score.txt", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    api = lm.score((runs / "score.txt").read_text())
    assert abs(cli["bits_per_char"] - api.bits_per_char) <= 1e-9
    assert cli["chars"] == api.chars and cli["tokens"] == api.tokens
    assert len(api.logprobs) == api.tokens and abs(-api.logprobs.sum() - api.nll) < 1e-3 * api.nll
    for row, member in zip(cli.get("members", []), api.members):
        assert abs(row["bits_per_char"] - member.bits_per_char) <= 1e-9


@pytest.mark.parametrize("members", [1, 2])
def test_dynamic_score_equals_charlm_eval_dynamic(runs, members):
    lm = load(runs, members)
    result = run("eval", *paths(runs, members), "--text", runs / "score.txt", "--json", "--dynamic", "--device", "cpu")
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    text = (runs / "score.txt").read_text()
    static, adapting = lm.score(text), lm.score(text, dynamic=True)
    assert abs(cli["static"]["bits_per_char"] - static.bits_per_char) <= 1e-9
    assert abs(cli["dynamic"]["bits_per_char"] - adapting.bits_per_char) <= 1e-9
    assert cli["dynamic"]["update"] == adapting.dynamic["update"] == "rms"
    assert adapting.bits_per_char != static.bits_per_char
    # Scoring dynamically works on a copy: the model scores as before afterwards.
    assert lm.score(text).bits_per_char == static.bits_per_char


def test_split_score_equals_charlm_eval(runs):
    lm = load(runs)
    result = run("eval", *paths(runs), "--split", "val", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["bits_per_char"] - lm.score(split="val").bits_per_char) <= 1e-9


def test_adapted_equals_sample_adapt(runs):
    lm = load(runs)
    adapt_text = runs / "score.txt"
    result = run("sample", *paths(runs), "--adapt", adapt_text, "--prime", "The", "--length", 60, "--seed", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    adapted = lm.adapted(adapt_text.read_text())
    assert result.stdout == "The" + adapted.generate("The", 60, seed=2) + "\n"
    assert adapted.adaptation is not None and adapted.adaptation.dynamic["update"] == "rms"
    assert adapted.generate("The", 60, seed=2) != lm.generate("The", 60, seed=2)


def test_sixteen_streams_together_equal_each_alone(runs):
    lm = load(runs)
    settings = [
        dict(temperature=0.5 + 0.1 * i, top_k=None if i % 3 else 5, top_p=0.9 if i % 2 else None, greedy=i == 7, seed=100 + i)
        for i in range(16)
    ]
    primes = ["The " + "abcdefghijklmnop"[i] * (1 + i % 4) for i in range(16)]
    lengths = [40 + 7 * i for i in range(16)]
    streams = lm.streams()
    ids = [streams.add(p, n, **kw) for p, n, kw in zip(primes, lengths, settings)]
    got = {i: "" for i in ids}
    steps = 0
    while streams.active:
        for event in streams.step():
            got[event.stream] += event.text
        steps += 1
    # Primes run together, a step advancing each by the shortest remainder: 4 lengths take 4 steps, then one per symbol.
    assert steps == max(lengths) + len({len(p) for p in primes}) - 1
    alone = [lm.generate(p, n, **kw) for p, n, kw in zip(primes, lengths, settings)]
    assert [got[i] for i in ids] == alone


def test_streams_join_and_leave_at_any_step(runs):
    lm = load(runs)
    streams = lm.streams()
    first = streams.add("The", 30, seed=1)
    text = {first: ""}
    for _ in range(10):
        for e in streams.step():
            text[e.stream] += e.text
    late = streams.add("A lazy", 30, seed=2)
    gone = streams.add("Seven", 30, seed=3)
    text.update({late: "", gone: ""})
    for e in streams.step():
        text[e.stream] += e.text
    assert streams.remove(gone) and not streams.remove(gone)
    for e in streams.run():
        text[e.stream] += e.text
    assert text[first] == lm.generate("The", 30, seed=1)
    assert text[late] == lm.generate("A lazy", 30, seed=2)
    assert streams.active == 0


def test_background_primes_give_the_same_text(runs):
    """The server's Streams run the primes on a thread of their own while the batch steps: the same text as each
    stream alone; a stream removed while its prime runs never appears; close() ends the thread."""
    from charlm.decoding.streams import Streams

    lm = load(runs)
    streams = Streams(lm.scorer, prime_chunk=8, background_primes=True)
    first = streams.add("The quick brown", 40, seed=1)
    text = {first: ""}
    for _ in range(5):
        for e in streams.step():
            text[e.stream] += e.text
    late = streams.add("A lazy dog. " * 6, 40, seed=2, temperature=0.7)  # several chunks
    gone = streams.add("Seven", 40, seed=3)
    nothing = streams.add("Over", 0, seed=4)
    text.update({late: "", gone: ""})
    for e in streams.step():
        text[e.stream] += e.text
    assert streams.remove(gone)
    for e in streams.run():
        assert e.stream not in (gone, nothing)
        text[e.stream] += e.text
    assert text[first] == lm.generate("The quick brown", 40, seed=1)
    assert text[late] == lm.generate("A lazy dog. " * 6, 40, seed=2, temperature=0.7)
    assert text[gone] == "" and streams.active == 0
    streams.close()
    assert not any(t.name.startswith("charlm-prime") and t.is_alive() for t in threading.enumerate())


def test_stop_strings_end_the_text_before_them(runs):
    lm = load(runs)
    full = lm.generate("The", 200, seed=9)
    stop = full[40:43]
    cut = lm.generate("The", 200, seed=9, stop=[stop, "\u2603"])
    assert cut == full[: full.index(stop)]
    assert "".join(lm.stream("The", 200, seed=9, stop=stop)) == cut


def test_api_errors_are_charlm_errors_and_nothing_is_printed(runs, capsys):
    lm = load(runs)
    with pytest.raises(charlm.OptionError, match="temperature"):
        lm.generate("The", 10, temperature=0)
    with pytest.raises(charlm.OptionError, match="seed"):
        lm.generate("The", 10, seed=-1)
    with pytest.raises(charlm.DataError, match="vocabulary"):
        lm.generate("\u2603", 10)
    with pytest.raises(charlm.DataError, match="fewer than 2"):
        lm.score("a")
    with pytest.raises(charlm.CheckpointError):
        charlm.load(runs / "t.txt", device="cpu", dtype="fp32")
    with pytest.raises(charlm.OptionError, match="dtype"):
        charlm.load(*paths(runs), dtype="fp8")
    assert capsys.readouterr() == ("", "")


def test_info_vocab_and_config(runs):
    lm = load(runs, 2)
    assert lm.config.cell == "lstm" and len(lm.info) == 2 and lm.info[1]["model"]["cell"] == "gru"
    assert len(lm.vocab) == lm.config.vocab_size
    assert "ensemble of 2" in repr(lm)
