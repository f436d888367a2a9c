"""Labels read from the data (webdataset shards, Hugging Face rows): a class index, or a one-line error that
names the sample, before the loss crashes on it (an index error on a CPU, a device assert on a GPU)."""

from __future__ import annotations

from swin_train.errors import DataError


def checked_label(label: int, num_classes: int | None, where: str, fix: str) -> int:
    """`label` when it is one of 0..num_classes-1 (without a class count: when it is not negative)."""
    if label < 0 or (num_classes is not None and label >= num_classes):
        classes = f"one of the {num_classes} classes 0..{num_classes - 1}" if num_classes else "a class index"
        raise DataError(f"{where}: label {label} is not {classes}; {fix}")
    return label


def shard_label(cls: bytes, where: str, classes: tuple[str, ...] | None) -> int:
    """The label in a webdataset sample's `.cls` member, checked against the split's `classes` (when known)."""
    try:
        label = int(bytes(cls).decode().strip())
    except ValueError:
        raise DataError(f"{where}: its .cls is not an integer label") from None
    fix = "fix the .cls, or the index's classes (model.num_classes where it names none)"
    return checked_label(label, len(classes) if classes else None, where, fix)
