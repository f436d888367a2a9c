"""allocator.keep_freed_memory: a large tensor allocated again after a free does not page-fault again."""

import json
import platform
import subprocess
import sys

import pytest

from tests.helpers import env_for_subprocess

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

PROBE = """
import json, resource, torch
from swin_train.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
faulted = []
for _ in range(4):  # a training step's activations: the same large sizes, allocated and freed again
    before = faults()
    x = torch.ones(25_000_000)  # 100 MB, above glibc's default mmap threshold
    del x
    faulted.append(faults() - before)
print(json.dumps({"applied": applied, "faults": min(faulted[1:])}))  # the first round grows the heap
"""


def _probe(**env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env_for_subprocess(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    tuned = _probe()
    assert tuned["applied"] and tuned["faults"] < 1_000  # 100 MB is ~24,000 pages of 4 KiB


def test_opt_out_keeps_the_system_defaults():
    default = _probe(SWIN_TRAIN_SYSTEM_MALLOC="1")
    assert not default["applied"] and default["faults"] > 10_000
