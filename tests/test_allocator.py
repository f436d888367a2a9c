"""allocator.keep_freed_memory: a large tensor allocated again after a free does not page-fault again."""

import json
import platform
import subprocess
import sys

import pytest

from tests.helpers import env_for_subprocess

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

PROBE = """
import json, os, resource, torch
from swin_train.allocator import keep_freed_memory
largest = int(os.environ["LARGEST"]) if os.environ.get("LARGEST") else None
applied = keep_freed_memory(largest)
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
    tuned = _probe(LARGEST=str(100_000_000))  # a 100 MB activation, as the probe allocates
    assert tuned["applied"] and tuned["faults"] < 1_000  # 100 MB is ~24,000 pages of 4 KiB


def test_opt_out_keeps_the_system_defaults():
    default = _probe(SWIN_TRAIN_SYSTEM_MALLOC="1")
    assert not default["applied"] and default["faults"] > 10_000


def test_small_activations_keep_the_system_defaults(monkeypatch):
    """Below glibc's own largest mmap threshold the settings would only hold memory: not applied."""
    from swin_train import allocator
    from swin_train.models.arch import largest_activation_bytes

    micro = largest_activation_bytes(batch_size=64, img_size=32, patch_size=2, embed_dim=48, mlp_ratio=4.0)
    swin_t = largest_activation_bytes(batch_size=8, img_size=224, patch_size=4, embed_dim=96, mlp_ratio=4.0)
    assert (
        micro
        == 64 * 16 * 16 * 192 * 4
        < allocator.DYNAMIC_MMAP_THRESHOLD_MAX
        < swin_t
        == 8 * 56 * 56 * 384 * 4
    )
    monkeypatch.setattr(allocator, "_applied", False)  # as in a fresh process
    assert not allocator.keep_freed_memory(micro) and not allocator._applied
