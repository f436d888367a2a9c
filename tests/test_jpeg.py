"""data/jpeg.py: the JPEG decoder of the fast path and the device path (TorchCodec, else torchvision's
decoders, else Pillow) gives today's pixels bitwise: torchvision's `decode_jpeg` (what those paths called)
and Pillow's (what the whole-image path, `data.fast_decode: false` and the decoded-image cache, decodes
with), on photographs and on grayscale, CMYK, progressive and EXIF-oriented files; without TorchCodec the
decode tests pass on the fallbacks."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import env_for_subprocess, photo_jpegs
from PIL import Image

from swin_train.data import jpeg
from swin_train.data.decode import decode_pixels, open_encoded
from swin_train.data.device_decode import DeviceDecode
from swin_train.data.folder import decode_image
from swin_train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ORIENTATION = 0x0112  # the EXIF tag


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Photographs cut as the loader benchmark cuts them, and one of them as every other kind of JPEG."""
    photos = photo_jpegs(16, seed=11)
    image = Image.open(io.BytesIO(photos[0])).convert("RGB")
    out = {f"photo {i}": data for i, data in enumerate(photos)}
    out["grayscale"] = _jpeg(image.convert("L"), quality=90)
    out["cmyk"] = _jpeg(image.convert("CMYK"), quality=90)
    out["progressive"] = _jpeg(image, quality=85, progressive=True)
    out["4:4:4"] = _jpeg(image, quality=95, subsampling=0)
    out["restart markers"] = _jpeg(image, quality=80, restart_marker_blocks=4)
    out["rgb, no ycbcr"] = _jpeg(image, quality=90, keep_rgb=True)
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        out[f"exif orientation {orientation}"] = _jpeg(image, quality=90, exif=exif.tobytes())
    turned = out["exif orientation 6"]
    xmp = _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")
    out["xmp before exif"] = turned[:2] + xmp + turned[2:]
    out["fill byte before a marker"] = turned[:2] + b"\xff" + turned[2:]
    return out


def _torchvision(data: bytes) -> torch.Tensor:
    """What the fast path decoded until now: torchvision's decode_jpeg, mode RGB (no EXIF rotation)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", jpeg.TORCHVISION_DEPRECATION, DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def test_the_fast_and_device_paths_decode_photos_cmyk_grayscale_progressive_and_exif_jpegs_as_before(
    files, tmp_path
):
    for name, data in files.items():
        before = _torchvision(data)
        path = tmp_path / "image.jpg"
        path.write_bytes(data)
        whole = decode_image(path)  # the whole-image path (Pillow): data.fast_decode false, the decoded cache
        assert torch.equal(before, _pixels(whole)), name  # the two decoders of today agree
        fast, factor = decode_pixels(open_encoded(data))  # the fast path (training, evaluation, shards)
        assert factor == 1.0 and torch.equal(fast, before), f"{name}: fast path ({jpeg.jpeg_decoder()})"
    if jpeg.jpeg_decoder() != "pillow":  # data.decode: cuda's batched call, here on the CPU
        names = list(files)
        decoded = DeviceDecode("cpu").decode([files[n] for n in names], names, list(range(len(names))))
        assert all(torch.equal(d, _torchvision(files[n])) for d, n in zip(decoded, names))


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_torchcodec_decodes_wherever_it_loads():
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:
        pytest.skip("TorchCodec does not load here: the fallback decodes (the next test runs both)")
    assert jpeg.jpeg_decoder() == "torchcodec" and jpeg.skipped_decoders() == {}


def test_exif_hidden_renames_each_app1_segment_before_the_scan_and_nothing_else():
    exif, xmp = _segment(0xE1, b"Exif\x00\x00MM"), _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00")
    dqt = _segment(0xDB, bytes([0, 0xFF, 0xE1] + [1] * 62))  # an FF E1 inside another segment's payload
    # a fill byte before a marker, stray bytes between segments (libjpeg skips both), an FF E1 in the scan
    head = b"\xff\xd8" + _segment(0xE0, b"JFIF\x00") + b"\xff" + exif + b"\x00\x07" + xmp + dqt
    data = head + _segment(0xDA, b"\x01\x02") + b"\x12\xff\x00\xff\xe1\x34" + b"\xff\xd9"
    original = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    hidden = jpeg.exif_hidden(original)
    changed = (hidden != original).nonzero().flatten().tolist()
    assert changed == [data.index(exif) + 1, data.index(xmp) + 1] and hidden[changed].tolist() == [0xEF] * 2
    plain = torch.frombuffer(bytearray(b"\xff\xd8" + dqt + b"\xff\xd9"), dtype=torch.uint8)
    assert jpeg.exif_hidden(plain) is plain  # no APP1: no copy


def test_the_decoder_choice_starts_where_swin_train_jpeg_decoder_says(files, monkeypatch):
    data = files["exif orientation 6"]
    for library in ("torchvision", "pillow"):
        monkeypatch.setenv(jpeg.DECODER_ENV, library)
        assert jpeg.jpeg_decoder() == library and "torchcodec" in jpeg.skipped_decoders()
        assert torch.equal(decode_pixels(open_encoded(data))[0], _torchvision(data))
    monkeypatch.setenv(jpeg.DECODER_ENV, "nvjpeg")
    with pytest.raises(ConfigError, match=r"^SWIN_TRAIN_JPEG_DECODER='nvjpeg': expected one of torchcodec, "):
        jpeg.jpeg_decoder()


# Runs pytest with TorchCodec hidden from imports (as if not installed), then prints the decoder chosen.
HIDE_TORCHCODEC = """
import sys
class HideTorchCodec:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torchcodec":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, HideTorchCodec())
import pytest
code = pytest.main(sys.argv[1:])
from swin_train.data import jpeg
print("decoder:", jpeg.jpeg_decoder(), jpeg.skipped_decoders())
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "fallback, tests",
    [
        ("torchvision", ["tests/test_jpeg.py", "tests/test_fast_decode.py", "tests/test_device_decode.py"]),
        # torchvision's decoders gone too: Pillow decodes and the workers decode for data.decode: cuda
        ("pillow", ["tests/test_jpeg.py", "tests/test_fast_decode.py", "tests/test_predict.py"]),
    ],
)
def test_without_torchcodec_the_decode_tests_pass_on_the_fallback(fallback, tests):
    env = env_for_subprocess(**({jpeg.DECODER_ENV: "pillow"} if fallback == "pillow" else {}))
    select = "not without_torchcodec and not wherever_it_loads and not starts_where"
    command = [sys.executable, "-c", HIDE_TORCHCODEC, "-x", "-p", "no:cacheprovider", "-k", select]
    result = subprocess.run(
        [*command, *tests], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"decoder: {fallback} " in result.stdout and " passed" in result.stdout
    if fallback == "torchvision":
        assert "(hidden by the test)" in result.stdout
