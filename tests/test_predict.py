"""swin-predict: a micro checkpoint trained on solid red / green / blue images, predicted from files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from swin_train.checkpoint import save_checkpoint
from swin_train.cli.predict import cli
from swin_train.config import config_to_dict, load_config
from swin_train.data.transforms import Preprocess, build_eval_transform
from swin_train.models.swin import SwinTransformer
from swin_train.predict import Failure, Prediction, Predictor, find_images

CLASSES = ["cat", "dog", "fish"]
COLORS = {"cat": (230, 20, 20), "dog": (20, 230, 20), "fish": (20, 20, 230)}  # red, green, blue
MICRO_OVERRIDES = [
    "model.patch_size=2",
    "model.embed_dim=24",
    "model.depths=[2, 2]",
    "model.num_heads=[2, 4]",
    "model.window_size=4",
    "data.img_size=32",
    "model.num_classes=3",
]


def _solid(path: Path, rgb: tuple[int, int, int], size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def _shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + delta)) for c in rgb)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The micro model is faster on one intra-op thread than on two (no OpenMP hand-offs), and much
    faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint without EMA, checkpoint with an EMA that always says 'fish', images folder)."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = load_config(None, MICRO_OVERRIDES)
    pre = Preprocess.from_config(cfg).to_dict()
    transform = build_eval_transform(Preprocess.from_dict(pre))
    # training set: 4 shades per colour, pushed through the checkpoint's own eval transform
    train_dir = root / "train"
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        for delta in (-20, -5, 5, 20):
            img = Image.open(_solid(train_dir / f"{name}{delta}.png", _shade(COLORS[name], delta)))
            xs.append(transform(img.convert("RGB")))
            ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)  # (12, 3, 32, 32), (12,)

    model = SwinTransformer(
        img_size=32,
        patch_size=2,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        num_classes=3,
        drop_path_rate=0.0,
    )
    assert set(model.state_dict()) == set(SwinTransformer(**cfg.model_kwargs()).state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).all()

    state = {
        "format": "swin-train/1",
        "model": model.state_dict(),
        "ema": None,
        "config": config_to_dict(cfg),
        "class_names": list(CLASSES),
        "preprocess": pre,
    }
    plain = root / "plain.pth"
    save_checkpoint(state, plain)
    # EMA weights that differ visibly from the raw ones: the head always prefers class 2 ("fish")
    ema_weights = {k: v.clone() for k, v in model.state_dict().items()}
    ema_weights["head.weight"].zero_()
    ema_weights["head.bias"].copy_(torch.tensor([0.0, 0.0, 10.0]))
    with_ema = root / "ema.pth"
    save_checkpoint(state | {"ema": {"module": ema_weights, "num_updates": 30, "calls": 30}}, with_ema)

    images = root / "images"
    for name, rgb in COLORS.items():
        _solid(images / f"{name}_like.png", _shade(rgb, 10), size=50)  # unseen shade and size
    _solid(images / "nested" / "deeper" / "blue2.jpg", _shade(COLORS["fish"], -12))
    (images / "notes.txt").write_text("not an image")
    _solid(images / ".hidden.png", COLORS["cat"])
    return plain, with_ema, images


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv) -> tuple[int, dict, str]:
    code, out, err = _run(capsys, *argv, "--json", "--device", "cpu")
    return code, json.loads(out), err


def test_find_images_recursive_sorted_images_only(trained):
    _, _, images = trained
    files, missing = find_images([images, images / "cat_like.png", images / "nope.png"])
    names = [f.relative_to(images).as_posix() for f in files]
    assert names == ["cat_like.png", "dog_like.png", "fish_like.png", "nested/deeper/blue2.jpg"]
    assert missing == [images / "nope.png"]


def test_text_output_names_checkpoint_classes(trained, capsys):
    plain, _, images = trained
    code, out, err = _run(capsys, "--checkpoint", plain, images, "--device", "cpu", "--topk", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    files = [line for line in lines if not line.startswith(" ")]
    assert files == [str(f) for f in find_images([images])[0]]
    assert len(lines) == 4 * 3  # file + 2 classes each
    assert all(line.split()[1] in CLASSES for line in lines if line.startswith(" "))
    assert lines[0] == str(images / "cat_like.png")
    prob, name = lines[1].split()
    assert name == "cat" and 0.5 < float(prob) < 1.0


def test_json_shape_and_probabilities(trained, capsys):
    plain, _, images = trained
    code, doc, err = _json(capsys, "--checkpoint", plain, images)  # default topk 5 > 3 classes
    assert code == 0 and err == ""
    assert set(doc) == {"checkpoint", "predictions", "failed"}
    assert doc["checkpoint"] == str(plain) and doc["failed"] == []
    assert len(doc["predictions"]) == 4
    for pred in doc["predictions"]:
        assert set(pred) == {"file", "topk"}
        top = pred["topk"]
        assert len(top) == 3  # capped at the number of classes
        assert [t["class"] for t in top] == [CLASSES[t["index"]] for t in top]
        assert sorted(t["index"] for t in top) == [0, 1, 2]
        probs = [t["prob"] for t in top]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # all classes shown: the full softmax
    top1 = {Path(p["file"]).name: p["topk"][0]["class"] for p in doc["predictions"]}
    assert top1 == {
        "cat_like.png": "cat",
        "dog_like.png": "dog",
        "fish_like.png": "fish",
        "blue2.jpg": "fish",
    }

    code, doc, _ = _json(capsys, "--checkpoint", plain, images / "dog_like.png", "--topk", "1")
    (pred,) = doc["predictions"]
    assert code == 0 and [t["class"] for t in pred["topk"]] == ["dog"]
    assert 0.5 < pred["topk"][0]["prob"] < 1.0  # a strict part of the distribution


def test_batch_size_does_not_change_predictions(trained):
    plain, _, images = trained
    predictor = Predictor.from_checkpoint(plain, device="cpu")
    files, _ = find_images([images])
    one = list(predictor.predict_files(files, topk=3, batch_size=1))
    many = list(predictor.predict_files(files, topk=3, batch_size=3))  # batches of 3 and 1
    assert [p.file for p in one] == [str(f) for f in files] == [p.file for p in many]
    for a, b in zip(one, many):
        assert [c.index for c in a.topk] == [c.index for c in b.topk]
        assert [c.prob for c in a.topk] == pytest.approx([c.prob for c in b.topk], abs=1e-5)


def test_corrupt_file_is_reported_and_others_still_printed(trained, capsys, tmp_path):
    plain, _, images = trained
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "truncated.jpg"
    _solid(truncated, COLORS["dog"], size=64)
    truncated.write_bytes(truncated.read_bytes()[:200])
    good = images / "cat_like.png"

    code, out, err = _run(capsys, "--checkpoint", plain, corrupt, good, truncated, "--device", "cpu")
    assert code == 1
    assert out.splitlines()[0] == str(good) and out.splitlines()[1].split()[1] == "cat"
    err_lines = err.strip().splitlines()
    assert sum(str(corrupt) in line for line in err_lines) == 1
    assert sum(str(truncated) in line for line in err_lines) == 1
    assert str(good) not in err

    code, doc, _ = _json(capsys, "--checkpoint", plain, corrupt, good, truncated, tmp_path / "missing.png")
    assert code == 1
    assert [p["file"] for p in doc["predictions"]] == [str(good)]
    failed = {f["file"]: f["error"] for f in doc["failed"]}
    assert set(failed) == {str(corrupt), str(truncated), str(tmp_path / "missing.png")}
    assert all(isinstance(e, str) and e and "\n" not in e for e in failed.values())
    assert failed[str(tmp_path / "missing.png")] == "No such file or directory"


def test_ema_weights(trained, capsys):
    plain, with_ema, images = trained
    code, out, err = _run(capsys, "--checkpoint", plain, images, "--ema", "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "EMA" in err and str(plain) in err

    red = images / "cat_like.png"
    _, raw, _ = _json(capsys, "--checkpoint", with_ema, red)
    _, ema, _ = _json(capsys, "--checkpoint", with_ema, red, "--ema")
    assert raw["predictions"][0]["topk"][0]["class"] == "cat"
    assert ema["predictions"][0]["topk"][0]["class"] == "fish"  # the EMA head's bias wins


@pytest.mark.parametrize("case", ["missing", "not_swin_train", "no_images", "no_such_input"])
def test_user_errors_are_one_line_exit_2(trained, capsys, tmp_path, case):
    plain, _, images = trained
    checkpoint, inputs, expect = plain, [images], ""
    if case == "missing":
        checkpoint, expect = tmp_path / "nope.pth", "does not exist"
    elif case == "not_swin_train":
        checkpoint, expect = tmp_path / "weights.pth", "not a swin-train checkpoint"
        torch.save({"model": torch.load(plain, weights_only=True)["model"]}, checkpoint)
    elif case == "no_such_input":
        inputs, expect = [tmp_path / "typo"], "typo does not exist"
    else:
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "readme.txt").write_text("x")
        inputs, expect = [tmp_path / "empty"], "no images found"
    code, out, err = _run(capsys, "--checkpoint", checkpoint, *inputs, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("swin-predict: error: ") and err.count("\n") == 1 and expect in err


def test_bad_topk_is_a_usage_error(trained, capsys):
    plain, _, images = trained
    with pytest.raises(SystemExit) as exit_info:  # argparse exits itself
        cli(["--checkpoint", str(plain), str(images), "--topk", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--topk" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_an_error(trained, capsys):
    plain, _, images = trained
    code, _, err = _run(capsys, "--checkpoint", plain, images, "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(trained):
    plain, _, images = trained
    files, _ = find_images([images])
    cpu = list(Predictor.from_checkpoint(plain, device="cpu").predict_files(files, topk=3))
    gpu = list(Predictor.from_checkpoint(plain, device="cuda").predict_files(files, topk=3))
    for a, b in zip(cpu, gpu):
        assert isinstance(a, Prediction) and isinstance(b, Prediction)
        assert a.topk[0].index == b.topk[0].index
        assert [c.prob for c in a.topk] == pytest.approx([c.prob for c in b.topk], abs=1e-3)


def test_failure_type_for_unreadable_file(trained, tmp_path):
    plain, _, _ = trained
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"")
    (result,) = Predictor.from_checkpoint(plain, device="cpu").predict_files([bad])
    assert isinstance(result, Failure) and result.file == str(bad) and "\n" not in result.error


def test_predict_decodes_as_the_runs_evaluation_did(trained, tmp_path):
    """The run's data.fast_decode (default: on) decides the decode path, as it does for swin-eval."""
    from swin_train.data.decode import open_encoded
    from swin_train.predict import load_image

    photo = tmp_path / "noisy.jpg"
    pixels = torch.randint(0, 256, (90, 70, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(photo, quality=90)
    pre = Preprocess.from_config(load_config(None, MICRO_OVERRIDES))
    fast = Predictor.from_checkpoint(trained[0], device="cpu")
    expected = build_eval_transform(pre, fast_decode=True)(open_encoded(photo.read_bytes()))
    assert torch.equal(load_image(photo, fast.transform), expected)
    state = torch.load(trained[0], weights_only=True)
    state["config"]["data"]["fast_decode"] = False
    save_checkpoint(state, tmp_path / "full.pth")
    full = Predictor.from_checkpoint(tmp_path / "full.pth", device="cpu")
    whole = build_eval_transform(pre)(Image.open(photo).convert("RGB"))
    assert torch.equal(load_image(photo, full.transform), whole) and not torch.equal(whole, expected)
