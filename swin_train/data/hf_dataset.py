"""Hugging Face `datasets` as training data: a folder written by `save_to_disk`, or parquet files (the
Hub's `imagenet-1k` layout: `data/train-00000-of-00294.parquet`, ...). Both are map-style, so the
resumable train sampler and the exact eval sampler apply as to an ImageFolder. Needs the optional
extra: `pip install 'swin-train[hf]'`."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from swin_train.data.decode import Encoded, UndecodableImage, open_encoded, rgb_image, takes_encoded
from swin_train.data.folder import DECODE_ERRORS, SampleKey, decode_error_reason, split_key
from swin_train.data.labels import checked_label
from swin_train.data.seeding import transform_sample
from swin_train.errors import DataError

# Files `save_to_disk` writes (a DatasetDict, a Dataset).
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Hugging Face datasets needs the `datasets` package: pip install 'swin-train[hf]'"
        ) from None
    return datasets


def is_hf_source(path: str) -> bool:
    """A `save_to_disk` folder, a parquet file, or a folder with parquet files (up to two levels down)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix == ".parquet"
    if not p.is_dir():
        return False
    return (
        any((p / m).is_file() for m in SAVED_MARKERS)
        or any(p.glob("*.parquet"))
        or any(p.glob("*/*.parquet"))
    )


def parquet_files(root: Path, split: str) -> list[str]:
    """The parquet files of `split` under `root`: `split-*.parquet` or `split/*.parquet`, one level down
    or at the top (the Hub puts them under `data/`)."""
    patterns = (
        f"{split}-*.parquet",
        f"{split}/*.parquet",
        f"*/{split}-*.parquet",
        f"*/{split}/*.parquet",
        f"{split}.parquet",
    )
    return sorted({str(f) for pattern in patterns for f in root.glob(pattern)})


def load_split(path: str, split: str):
    """One split of a saved dataset or of parquet files, as a `datasets.Dataset`."""
    ds_lib = _datasets()
    root = Path(path).expanduser()
    if root.is_dir() and any((root / m).is_file() for m in SAVED_MARKERS):
        try:
            saved = ds_lib.load_from_disk(str(root))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load the saved dataset {root} ({' '.join(str(e).split())})") from None
        if isinstance(saved, ds_lib.DatasetDict):
            if split not in saved:
                raise DataError(
                    f"the dataset {root} has no split '{split}' (it has: {', '.join(saved)}); "
                    "set data.train_split / data.val_split"
                )
            return saved[split]
        raise DataError(
            f"{root} holds a single Dataset without splits; save a DatasetDict with '{split}' "
            "(DatasetDict({'train': ..., 'validation': ...}).save_to_disk(...))"
        )
    files = [str(root)] if root.is_file() else parquet_files(root, split)
    if not files:
        raise DataError(
            f"no parquet files for split '{split}' under {root} (expected {split}-*.parquet or {split}/*.parquet); "
            "set data.train_split / data.val_split"
        )
    try:
        return ds_lib.load_dataset("parquet", data_files={split: files}, split=split)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read the parquet files of split '{split}' under {root} ({' '.join(str(e).split())})"
        ) from None


def class_names_of(dataset, label_column: str) -> list[str]:
    """Class names from the label column's ClassLabel feature; for plain integer labels, '0'..'N-1'."""
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    if names:
        return [str(n) for n in names]
    labels = dataset[label_column]
    if not labels or not all(isinstance(x, int) for x in labels[:1000]):
        raise DataError(f"column '{label_column}' holds no integer class labels; set data.label_column")
    return [str(i) for i in range(max(labels) + 1)]


class HFImageDataset(Dataset):
    """(image, label) rows of a `datasets.Dataset`; keys may be ints or `SampleKey`s, whose seed makes the
    augmentation a pure function of the key, as in `ImageFolderDataset`. A transform that takes undecoded
    files (decode.takes_encoded) gets the stored bytes: the Image column is read with decode=False."""

    def __init__(
        self,
        dataset,
        transform: Callable | None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        where: str = "",
    ) -> None:
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise DataError(
                f"the dataset {where} has no column {', '.join(repr(c) for c in missing)} (columns: "
                f"{', '.join(dataset.column_names)}); set data.image_column / data.label_column"
            )
        self.encoded = takes_encoded(transform) and type(dataset.features[image_column]).__name__ == "Image"
        if self.encoded:  # rows then hold {'bytes', 'path'} instead of images `datasets` decoded whole
            dataset = dataset.cast_column(image_column, _datasets().Image(decode=False))
        self.dataset, self.transform, self.where = dataset, transform, where
        self.image_column, self.label_column = image_column, label_column
        self.classes = class_names_of(dataset, label_column)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[Image.Image | Encoded, int]:
        try:
            row = self.dataset[index]
            image = row[self.image_column]
            # -1: the Hub's mark of an unlabelled row
            fix = "filter such rows out or set data.label_column"
            label = checked_label(
                int(row[self.label_column]), len(self.classes), f"row {index} of {self.where}", fix
            )
            if isinstance(image, dict) and self.encoded:
                data = image.get("bytes") or Path(image["path"]).read_bytes()
                return open_encoded(data, f"row {index} of {self.where}"), label
            if isinstance(image, dict):  # an undecoded Image feature: {'bytes': ..., 'path': ...}
                image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
            if not isinstance(image, Image.Image):
                raise DataError(
                    f"column '{self.image_column}' of {self.where} does not hold images; set data.image_column"
                )
            return rgb_image(image), label
        except DECODE_ERRORS as e:
            raise self._undecodable(index, e) from None

    def _undecodable(self, index: int, e: BaseException) -> DataError:
        return DataError(f"cannot decode the image of row {index} of {self.where} ({decode_error_reason(e)})")

    def __getitem__(self, key: int | SampleKey) -> tuple[object, int]:
        index, seed = split_key(key)
        image, label = self._load(index)
        if self.transform is None:
            return image, label
        try:
            return transform_sample(self.transform, image, seed), label
        except UndecodableImage as e:  # an undecoded image's data failed in the transform
            raise self._undecodable(index, e.cause) from None


def build_hf_split(
    path: str, split: str, transform: Callable | None, *, image_column: str, label_column: str
) -> HFImageDataset:
    return HFImageDataset(
        load_split(path, split),
        transform,
        image_column=image_column,
        label_column=label_column,
        where=f"{path} (split '{split}')",
    )
