"""tfmq.hostcpu.keep_freed_memory: freed tensor memory is reused, not faulted in again."""
import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, torch
from tfmq.hostcpu import keep_freed_memory
applied = keep_freed_memory()
for _ in range(10):  # warm-up: the heap grows to hold it once
    torch.ones(16 * 2**20)  # allocated and freed; 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _probe(keep: str) -> dict:
    env = {**os.environ, "TFMQ_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    default, keep = _probe("0"), _probe("1")
    assert default["applied"] is False and keep["applied"] is True
    pages = 10 * 16 * 2**20 * 4 // 4096  # what ten fresh 64 MiB mappings fault in
    assert default["faults"] > 0.5 * pages  # the default: every allocation is a new mmap, faulted in again
    assert keep["faults"] < 0.02 * pages, (default, keep)
