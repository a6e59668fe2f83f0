"""charlm.allocator: freed memory is reused, so a repeated large allocation stops faulting pages in."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

PROBE = """
import resource, torch
from charlm.allocator import keep_freed_memory
applied = keep_freed_memory()
rows = torch.randn(256, 1024)
counts = []
for _ in range(10):  # like training steps: the same large blocks allocated and freed each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = rows.repeat(64, 1)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
    b = a * 2
    del a, b
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(counts[4:])[3])  # the median step, once the first few have grown the heap
"""


def faults(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "CHARLM_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, tuned = faults("charlm")
    if applied != "True":
        pytest.skip("not glibc: the settings do not apply")
    system_applied, system = faults("system")
    assert system_applied == "False"
    assert system > 2 * 16_384 * 0.9  # the default: each 64 MB block is mapped afresh, 16,384 pages
    assert tuned < system / 20


AFTER_PREPARE = """
import resource, sys, torch
from pathlib import Path
from charlm.allocator import keep_freed_memory
from charlm.data import prepare
applied = keep_freed_memory()
src = Path(sys.argv[1])
prepare.prepare([src], src.parent / "prepared")  # in the same process, as `charlm train TEXT` does
rows = torch.randn(256, 1024)
counts = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = rows.repeat(8, 1)  # 8 MiB: above the 1 MiB threshold prepare uses while it streams
    b = a * 2
    del a, b
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(counts[5:])[12])
"""


def test_prepare_in_the_same_process_leaves_the_training_settings(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("some text to prepare\n" * 20000)
    out = subprocess.run(
        [sys.executable, "-c", AFTER_PREPARE, str(src)], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: the settings do not apply")
    assert int(out[1]) < 100  # each 8 MiB block would fault in ~4,000 pages if prepare's threshold had stayed
