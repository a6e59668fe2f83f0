"""The checkpoint fuzzer in the suite: a few hundred seeded cases through load, info, sample, eval and train --resume.

Each ends in a clean error or in a success identical to the good file it was made from (see
tests/fuzzcases.py for the oracle); benchmarks/fuzz_checkpoints.py runs thousands of the same.
"""

import fuzzcases
import pytest

from charlm import checkpoint
from charlm.checkpoint import checks

SEED = 12
CASES = 13 * len(fuzzcases.FAMILIES)  # 338: every family 13 times


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return fuzzcases.Runner(root, fuzzcases.make_bases(root / "bases"))


def test_fuzzed_checkpoints_end_cleanly_or_unchanged(runner):
    totals, wall = fuzzcases.run_cases(runner, SEED, CASES)
    report = "\n".join(f"case {i} ({family}, {base}: {note}): {detail}" for i, family, base, note, detail in totals.examples)
    assert not totals.failures, f"{totals.failures}\n{report}"
    assert totals.cases == CASES and totals.clean + totals.success + totals.other == CASES
    assert totals.families["valid"][1] == 13  # valid re-encodings load, and behave exactly as the original
    assert totals.commands == 4 * CASES  # every case also went through info, sample, eval and train --resume
    assert wall < 120, wall


def _family_cases(runner, family, count=26):
    index = [name for name, _ in fuzzcases.FAMILIES].index(family)
    blobs = {name: b.blob for name, b in runner.bases.items()}
    return [fuzzcases.make_case(blobs, SEED, index + k * len(fuzzcases.FAMILIES)) for k in range(count)]


@pytest.mark.parametrize(
    "family, disabled, failure",
    [
        ("weight-change", "verify_checksums", "SilentGarbage"),
        ("nonfinite", "check_values", "AcceptedInvalid|SilentGarbage"),
        ("state-tensors", "_check_state_set", "AcceptedInvalid"),
    ],
)
def test_the_fuzzer_catches_a_missing_check(runner, monkeypatch, family, disabled, failure):
    """The oracle is not a rubber stamp: with one check switched off, the cases it guards against fail."""
    for module in (checkpoint, checks):  # wherever the reader looks the check up
        if hasattr(module, disabled):
            monkeypatch.setattr(module, disabled, lambda *a, **k: "none")
    totals = fuzzcases.Totals()
    for case in _family_cases(runner, family):
        totals.add(case, runner.run(case, with_cli=False))
    assert sum(totals.failures.get(kind, 0) for kind in failure.split("|")) > 0, totals.failures
