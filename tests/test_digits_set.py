"""scripts/digits_set.py: a real-data set with a fixed, stratified held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_module

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "digits_set.py"


@pytest.fixture(scope="module")
def digits_set():
    return load_module("digits_set", SCRIPT)


def test_a_quarter_of_each_class_is_held_out_and_the_seed_fixes_which(digits_set):
    labels = np.repeat(np.arange(3), [8, 12, 20])
    val = digits_set.held_out_split(labels, seed=0)
    assert [int(val[labels == c].sum()) for c in range(3)] == [2, 3, 5]
    assert np.array_equal(val, digits_set.held_out_split(labels, seed=0))
    assert not np.array_equal(val, digits_set.held_out_split(labels, seed=1))


def test_it_writes_an_image_folder_of_all_1797_scans(digits_set, tmp_path):
    pytest.importorskip("sklearn")
    counts = digits_set.write_set(tmp_path, size=16, fmt="jpeg", quality=90, seed=0)
    assert counts == {"train": 1347, "val": 450}
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [f"digit_{d}" for d in range(10)]
    assert len(list(tmp_path.rglob("*.jpg"))) == 1797
