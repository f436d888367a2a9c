"""Non-square training, evaluation and prediction (issue 31): data.img_size [H, W] on photographs, end to end."""

import json
import math
import signal
import subprocess
import sys

import onnx
import onnxruntime
import pytest
import torch
from helpers import (
    MICRO_OVERRIDES,
    assert_bitwise_equal,
    env_for_subprocess,
    photo_folder,
    photo_jpegs,
    run_cli,
    torchrun,
    weights,
)
from test_train import _kill_when, _records
from torch.utils.data import default_collate

from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as export_cli
from swin_train.cli.predict import cli as predict_cli
from swin_train.cli.train import cli as train_cli
from swin_train.config import AugConfig, DataConfig
from swin_train.data.decode import open_encoded
from swin_train.data.device_augment import DeviceAugment
from swin_train.data.device_decode import DeviceDecode
from swin_train.data.seeding import run_seeded
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.loading import load_trained_model
from swin_train.predict import Predictor, own_size_transform

# 36 x 52 px, patches of 4: a 9 x 13 grid, padded to 12 x 16 for windows of 4 (masked shifts), then 5 x 7
# (padded to 8 x 8); the eval crop keeps the photos' aspect ratio (crop_pct on the side that binds, as timm).
NON_SQUARE = [
    *MICRO_OVERRIDES,
    "model.num_classes=2",
    "data.img_size=[36, 52]",
    "eval.crop_pct=0.875",
    "data.batch_size=4",
    "train.epochs=2",
    "train.checkpoint_every_steps=3",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 photographs (300-500 px, JPEG), two classes, in train/ and val/."""
    return photo_folder(tmp_path_factory.mktemp("photos"), photo_jpegs(16, seed=3))


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """An uninterrupted non-square run (2 epochs of 4 steps)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_cli("train", "--data-path", photos, "--output", out, *NON_SQUARE)
    assert done.returncode == 0, done.stderr
    return out


def test_a_non_square_run_trains_on_h_x_w_crops_and_resumes_bitwise_after_kill_9(photos, trained, tmp_path):
    state = torch.load(trained / "last.pth", weights_only=True)
    assert state["config"]["data"]["img_size"] == [36, 52] and state["preprocess"]["img_size"] == [36, 52]
    model = load_trained_model(trained / "last.pth").model
    assert model.img_size == (36, 52) and model.layers[0].blocks[1].attn_mask.shape == (12, 16, 16)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "swin_train.cli.train", "--data-path", str(photos), "--output", str(run)]
    proc = subprocess.Popen(
        [*cmd, *NON_SQUARE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_for_subprocess(),
    )
    _kill_when(proc, run / "step-000000003.pth")  # mid-epoch 0
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli("train", "--data-path", photos, "--output", run, *NON_SQUARE)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_bitwise_equal(weights(trained / "last.pth"), weights(run / "last.pth"))
    timing = ("train_img_s", "train_epoch_time")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(_records(trained)) == strip(_records(run))


def test_evaluation_of_a_non_square_run_is_its_validation_and_exact_in_two_processes(
    trained, photos, tmp_path
):
    validation = _records(trained)[-1]
    results = {}
    for world in (1, 2):
        metrics = tmp_path / f"m{world}.json"
        args = ["--checkpoint", trained / "last.pth", "--data-path", photos, "--metrics-json", metrics]
        if world == 1:
            assert eval_cli(list(map(str, args))) == 0
        else:
            done = torchrun(world, "eval", *args)
            assert done.returncode == 0, done.stderr[-3000:]
        results[world] = json.loads(metrics.read_text())
    assert results[1]["num_samples"] == results[2]["num_samples"] == validation["val_num_samples"] == 16
    assert results[1]["top1"] == results[2]["top1"] == validation["val_top1"]


def test_resume_refuses_another_image_size_and_fine_tuning_to_it_loads_the_weights(trained, photos, tmp_path):
    run = tmp_path / "changed"
    run.mkdir()
    (run / "last.pth").write_bytes((trained / "last.pth").read_bytes())
    changed = [*NON_SQUARE, "data.img_size=[52, 36]", "train.epochs=3"]
    done = run_cli("train", "--data-path", photos, "--output", run, *changed)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "img_size [36, 52] -> [52, 36]" in done.stderr
    tuned = tmp_path / "tuned"
    args = ["--data-path", photos, "--output", tuned, *NON_SQUARE, "data.img_size=48", "train.epochs=1"]
    assert train_cli([*map(str, args), f"model.pretrained={trained / 'last.pth'}"]) == 0
    log = (tuned / "log.txt").read_text()
    assert "loaded" in log and "interpolated" not in log  # the position tables do not depend on the size
    assert load_trained_model(tuned / "last.pth").model.img_size == (48, 48)


def test_predict_at_each_images_own_size_pads_and_batches_by_size(trained, photos, tmp_path, capsys):
    files = sorted((photos / "val").rglob("*.jpg"))[:4]
    trained_model = load_trained_model(trained / "last.pth")
    predictor = Predictor.from_checkpoint(trained / "last.pth", device="cpu", own_size=True)
    results = list(predictor.predict_files(files, topk=2, batch_size=4))
    transform = own_size_transform(trained_model.preprocess)
    from swin_train.data.folder import decode_image

    for path, result in zip(files, results):
        image = transform(decode_image(path))
        assert image.shape[1:] == decode_image(path).size[::-1]  # its own H x W, no crop
        with torch.no_grad():
            probs = trained_model.model.eval()(image[None]).softmax(-1)[0]
        assert [c.index for c in result.topk] == probs.topk(2).indices.tolist()
        assert [c.prob for c in result.topk] == pytest.approx(probs.topk(2).values.tolist(), abs=1e-6)
    small = tmp_path / "small.png"
    from PIL import Image

    Image.new("RGB", (40, 6)).save(small)
    assert (
        predict_cli(["--checkpoint", str(trained / "last.pth"), "--own-size", str(small), str(files[0])]) == 1
    )
    out, err = capsys.readouterr()
    assert str(files[0]) in out
    assert f"cannot read {small}: 6x40 is smaller than the model's smallest input 16x16" in err


def test_the_eval_crop_of_a_non_square_size_keeps_the_aspect_ratio_as_timm_and_the_fast_path_agrees(photos):
    pre = Preprocess([36, 52], 0.875, "bicubic", (0.5,) * 3, (0.25,) * 3)
    slow, fast = (
        build_eval_transform(pre, uint8=True),
        build_eval_transform(pre, uint8=True, fast_decode=True),
    )
    assert "ResizeKeepRatio(size=(41, 59)" in repr(slow.transforms[0])  # floor(36 / 0.875), floor(52 / 0.875)
    from swin_train.data.folder import decode_image, read_encoded

    for path in sorted((photos / "val").rglob("*.jpg"))[:4]:
        a, b = slow(decode_image(path)), fast(read_encoded(path))
        assert a.shape == b.shape == (3, 36, 52)
        mse = ((a.float() - b.float()) ** 2).mean().item()  # 300-500 px photos to 59 px: reduced-scale DCT
        assert 10 * math.log10(255**2 / mse) >= 33.0  # the fast path's bound there (docs/design.md)


def test_a_non_square_model_exports_to_onnx_with_its_size_and_refuses_the_transformers_folder(
    trained, tmp_path, capsys
):
    path = tmp_path / "m.onnx"
    assert (
        export_cli(["--checkpoint", str(trained / "last.pth"), "--format", "onnx", "--out", str(path)]) == 0
    )
    metadata = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["preprocess"])["img_size"] == [36, 52]
    model = load_trained_model(trained / "last.pth").model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(36, 52), (61, 40)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(images).numpy()
        assert abs(session.run(["logits"], {"images": images.numpy()})[0] - expected).max() < 1e-4
    capsys.readouterr()
    assert (
        export_cli(
            ["--checkpoint", str(trained / "last.pth"), "--format", "hf", "--out", str(tmp_path / "hf")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "image size 36x52 is not square: the transformers export writes square" in err
    )


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "original-mstd0.5"])
def test_device_augmented_non_square_batches_are_bitwise_the_workers(spec):
    photos = photo_jpegs(6, seed=3)
    data, aug = DataConfig(img_size=[40, 64]), AugConfig(auto_augment=spec)
    workers = build_train_transform(data, aug, uint8=True)
    on_device = build_train_transform(data, aug, uint8=True, on_device=True)
    keys = [(i, seed) for seed in range(3) for i in range(len(photos))]
    expected = torch.stack([run_seeded(workers, open_encoded(photos[i]), s) for i, s in keys])
    batch = default_collate([run_seeded(on_device, open_encoded(photos[i]), s) for i, s in keys])
    got = DeviceAugment(on_device.transforms[-1].fill)(batch)
    assert got.shape == (len(keys), 3, 40, 64) and torch.equal(got, expected)


@pytest.mark.parametrize("size", [[224, 320], [320, 224]])
def test_device_decoded_non_square_eval_crops_stay_within_65_db_of_the_cpu_fast_path(size):
    """The same floor as at 224 x 224 (test_device_decode); sizes the photos shrink to at most 2x, where the CPU
    path decodes at full scale as the device does."""
    photos = photo_jpegs(6, seed=4)
    pre = Preprocess(size, 0.875, "bicubic", (0.5,) * 3, (0.25,) * 3)
    cpu = build_eval_transform(pre, uint8=True, fast_decode=True)
    cuda = build_eval_transform(pre, uint8=True, fast_decode=True, decode="cuda")
    expected = torch.stack([cpu(open_encoded(p)) for p in photos])
    got = DeviceDecode("cpu")(default_collate([cuda(open_encoded(p)) for p in photos]))
    assert got.shape == (6, 3, *size)
    mse = ((got.float() - expected.float()) ** 2).flatten(1).mean(1)
    assert (10 * torch.log10(255**2 / mse.clamp(min=1e-12))).min() >= 65.0
