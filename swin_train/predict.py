"""Inference with a trained swin-train checkpoint: images in, top-k class names with probabilities out.

    predictor = Predictor.from_checkpoint("output/run/best.pth")          # class names + eval transform
    files, missing = find_images(["photos/", "cat.jpg"])
    for result in predictor.predict_files(files, topk=5):                 # in input order, batched
        print(result.file, result.topk[0].name if isinstance(result, Prediction) else result.error)

Images are decoded as the training run's evaluation decoded them (no EXIF rotation; with the run's
`data.fast_decode` the eval fast path of data/decode.py: a JPEG decoded once and resized on tensors) and go
through the checkpoint's own eval transform, so predictions match `swin-eval`. With `own_size` each image is
classified at its own size instead (decoded whole and normalised, no resize or crop; the model pads it to
whole patches and windows), batched with the images of the same size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as tv_transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from swin_train.data.decode import UndecodableImage, takes_encoded
from swin_train.data.folder import (
    DECODE_ERRORS,
    decode_error_reason,
    decode_image,
    is_image_file,
    read_encoded,
)
from swin_train.data.transforms import Preprocess, build_eval_transform
from swin_train.device import resolve_device
from swin_train.errors import DataError
from swin_train.loading import load_trained_model

# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ClassProb:
    name: str
    index: int
    prob: float


@dataclass(frozen=True)
class Prediction:
    file: str
    topk: list[ClassProb]  # most probable first

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "topk": [{"class": c.name, "index": c.index, "prob": c.prob} for c in self.topk],
        }


@dataclass(frozen=True)
class Failure:
    file: str
    error: str  # one line

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.error}


# ----------------------------------------------------------------------------------------------
# Inputs


def find_images(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(image files, missing paths). A folder contributes its image files (recursively, same rules as
    the training data: image extensions only, hidden files and folders skipped), sorted; a file named
    explicitly is taken whatever its extension. Order follows `paths`; duplicates are dropped.
    Raises DataError when there is no file at all to predict."""
    files: list[Path] = []
    missing: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files += _images_under(path)
        elif path.exists():
            files.append(path)
        else:
            missing.append(path)
    if not files:
        shown = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        if paths and len(missing) == len(paths):
            raise DataError(f"{shown} {'does' if len(paths) == 1 else 'do'} not exist; check the path")
        why = f" ({len(missing)} of them do not exist)" if missing else ""
        raise DataError(
            f"no images found in {shown or 'no paths'}{why}; pass image files or folders holding "
            f"images ({', '.join(IMG_EXTENSIONS)})"
        )
    return list(dict.fromkeys(files)), missing


def _images_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    seen: set[str] = set()  # real paths of visited folders: a symlink loop is walked once
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if is_image_file(f)]
    return sorted(found)


def load_image(path: Path, transform: Callable) -> torch.Tensor | str:
    """The transformed image (C, H, W), or a one-line reason why it cannot be read."""
    try:
        if takes_encoded(transform):  # the eval fast path decodes the file itself
            return transform(read_encoded(path))
        return transform(decode_image(path))
    except DECODE_ERRORS as e:
        return decode_error_reason(e)
    except UndecodableImage as e:  # the header read, the data did not
        return decode_error_reason(e.cause)


class Predictor:
    """A model in eval mode, its eval transform and class names, on one device."""

    def __init__(
        self, model: nn.Module, transform: Callable, class_names: Sequence[str], device: torch.device
    ):
        self.model = model.to(device).eval()
        self.transform = transform
        self.class_names = list(class_names)
        self.device = device

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, device: str | None = None, ema: bool = False, own_size: bool = False
    ) -> Predictor:
        """Build from a swin-train checkpoint or export (`loading.load_trained_model`); `ema` takes
        the EMA weights; `own_size`: each image at its own size (`own_size_transform`)."""
        dev = resolve_device(device)
        trained = load_trained_model(path, ema=ema)
        if own_size:
            transform = own_size_transform(trained.preprocess)
        else:
            transform = build_eval_transform(trained.preprocess, fast_decode=trained.config.data.fast_decode)
        return cls(trained.model, transform, trained.class_names, dev)

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor, topk: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) preprocessed images -> (probs, indices), each (B, k), k = min(topk, classes),
        most probable first."""
        logits = self.model(images.to(self.device, non_blocking=True))  # (B, num_classes)
        probs = logits.float().softmax(dim=-1)
        top = probs.topk(min(topk, probs.shape[-1]), dim=-1)  # sorted
        return top.values.cpu(), top.indices.cpu()

    def predict_files(
        self,
        files: Sequence[str | os.PathLike],
        *,
        topk: int = 5,
        batch_size: int = 32,
        workers: int | None = None,
    ) -> Iterator[Prediction | Failure]:
        """One Prediction or Failure per file, in input order, computed `batch_size` images at a time.

        Decoding + transform run in a thread pool (PIL releases the GIL while decoding and resizing),
        and the next batch is decoded while the model runs on the current one; a DataLoader would need
        worker processes and a collate that carries failures, for no gain at this size.
        """
        if topk < 1 or batch_size < 1:
            raise ValueError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
        chunks = [[Path(f) for f in files[i : i + batch_size]] for i in range(0, len(files), batch_size)]
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            submit = lambda chunk: [pool.submit(load_image, p, self.transform) for p in chunk]
            pending = submit(chunks[0]) if chunks else []
            for n, chunk in enumerate(chunks):
                loaded = [future.result() for future in pending]
                pending = submit(chunks[n + 1]) if n + 1 < len(chunks) else []
                yield from self._predict_loaded(chunk, loaded, topk)

    def _predict_loaded(
        self, chunk: list[Path], loaded: list[torch.Tensor | str], topk: int
    ) -> list[Prediction | Failure]:
        loaded = [self._fits(x) if isinstance(x, torch.Tensor) else x for x in loaded]
        results: list[Prediction | Failure] = [
            Failure(str(path), x) if isinstance(x, str) else None for path, x in zip(chunk, loaded)
        ]
        by_size: dict[tuple, list[int]] = {}  # images of one size make one batch (one batch without own_size)
        for i, x in enumerate(loaded):
            if isinstance(x, torch.Tensor):
                by_size.setdefault(tuple(x.shape), []).append(i)
        for good in by_size.values():
            probs, indices = self.predict_batch(torch.stack([loaded[i] for i in good]), topk)
            for row, i in enumerate(good):
                top = [
                    ClassProb(self.class_names[c], c, p)
                    for p, c in zip(probs[row].tolist(), indices[row].tolist())
                ]
                results[i] = Prediction(str(chunk[i]), top)
        return results

    def _fits(self, image: torch.Tensor) -> torch.Tensor | str:
        """The image, or why the model cannot take it (smaller than its smallest input, at its own size)."""
        min_h, min_w = getattr(self.model, "min_input_size", (0, 0))
        if image.shape[1] < min_h or image.shape[2] < min_w:
            return f"{image.shape[1]}x{image.shape[2]} is smaller than the model's smallest input {min_h}x{min_w}"
        return image


def own_size_transform(preprocess: Preprocess) -> Callable:
    """An RGB image at its own size, made a tensor and normalised as timm's eval transform does (ToTensor,
    Normalize): (3, H, W) float."""
    return tv_transforms.Compose(
        [
            tv_transforms.ToTensor(),
            tv_transforms.Normalize(torch.tensor(preprocess.mean), torch.tensor(preprocess.std)),
        ]
    )
