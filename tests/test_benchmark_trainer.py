"""scripts/benchmark_trainer.py: the recipe's mapping onto both trainers, the generated data, measuring a
process tree, parsing both trainers' results, the pairwise ratios, and a tiny end-to-end run.

timm's train.py is not part of timm's wheel: set TIMM_TRAIN=/path/to/pytorch-image-models/train.py to check
its argument parsing and run it in the end-to-end test; without it only the swin-train side runs.
"""

import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import env_for_subprocess, load_module, script_parts

from swin_train.errors import DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_trainer.py"
TIMM_TRAIN = os.environ.get("TIMM_TRAIN")


@pytest.fixture(scope="module")
def bt():
    yield load_module("benchmark_trainer", SCRIPT)
    sys.modules.pop("benchmark_trainer", None)


@pytest.fixture(scope="module")
def trainerbench(bt):
    return script_parts("trainerbench", "recipe", "shapes", "measure", "results")


def flag_values(argv: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next flag."""
    i = argv.index(flag) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


def test_recipe_maps_onto_timm_flags(bt, trainerbench, tmp_path):
    recipe = bt.Recipe()
    argv = trainerbench.recipe.timm_command(
        recipe, tmp_path / "train.py", tmp_path / "data", tmp_path / "out", "run"
    )
    assert flag_values(argv, "--model-kwargs") == [
        "embed_dim=48",
        "depths=(2,2,2)",
        "num_heads=(3,6,12)",
        "patch_size=2",
        "window_size=4",
        "img_size=32",
    ]
    # timm adds --warmup-prefix epochs to --epochs: 9 cosine epochs after 1 warmup epoch = swin-train's 10
    assert flag_values(argv, "--epochs") == ["9"] and flag_values(argv, "--warmup-epochs") == ["1"]
    assert "--warmup-prefix" in argv and "--sched-on-updates" in argv
    expected = {
        "--lr": ["0.002"],
        "--warmup-lr": ["1e-05"],
        "--min-lr": ["1e-05"],
        "--weight-decay": ["0.05"],
        "--clip-grad": ["5.0"],
        "--smoothing": ["0.1"],
        "--scale": ["0.6", "1.0"],
        "--batch-size": ["64"],
        "--workers": ["1"],
        "--reprob": ["0"],
        "--mixup": ["0"],
        "--cutmix": ["0"],
        "--color-jitter": ["0"],
        "--crop-pct": ["1.0"],
        "--train-interpolation": ["bicubic"],
        "--input-size": ["3", "32", "32"],
        "--opt": ["adamw"],
        "--device": ["cpu"],
        "--num-classes": ["10"],
        "--drop-path": ["0.1"],
    }
    for flag, values in expected.items():
        assert flag_values(argv, flag) == values, flag
    assert "--aa" not in argv and "--amp" not in argv


@pytest.mark.skipif(not TIMM_TRAIN, reason="set TIMM_TRAIN to timm's train.py to check its parsing")
def test_timm_train_parses_the_flags_as_meant(bt, trainerbench, tmp_path):
    timm_train = load_module("timm_train_under_test", TIMM_TRAIN)
    argv = trainerbench.recipe.timm_command(
        bt.Recipe(), Path(TIMM_TRAIN), tmp_path / "data", tmp_path / "out", "run"
    )
    args = timm_train.parser.parse_args(argv[2:])
    assert args.model_kwargs == dict(
        embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), patch_size=2, window_size=4, img_size=32
    )
    assert (args.epochs, args.warmup_epochs, args.warmup_prefix, args.sched_on_updates) == (9, 1, True, True)
    assert (args.lr, args.warmup_lr, args.min_lr, args.weight_decay) == (2e-3, 1e-5, 1e-5, 0.05)
    assert (args.scale, args.color_jitter, args.aa, args.reprob, args.mixup, args.cutmix) == (
        [0.6, 1.0],
        0.0,
        None,
        0.0,
        0.0,
        0.0,
    )
    assert (args.train_interpolation, args.crop_pct, args.smoothing, args.clip_grad) == (
        "bicubic",
        1.0,
        0.1,
        5.0,
    )


def test_swin_config_carries_the_same_recipe(bt, trainerbench, tmp_path):
    cfg = trainerbench.recipe.swin_config(
        replace(bt.Recipe(), epochs=7, warmup_epochs=2), tmp_path / "data", tmp_path / "out"
    )
    m, d, t, a = cfg["model"], cfg["data"], cfg["train"], cfg["aug"]
    assert (m["embed_dim"], m["depths"], m["num_heads"], m["patch_size"], m["window_size"]) == (
        48,
        [2, 2, 2],
        [3, 6, 12],
        2,
        4,
    )
    assert (d["img_size"], d["batch_size"], d["num_workers"], d["dataset"]) == (32, 64, 1, "imagefolder")
    assert (t["epochs"], t["warmup_epochs"], t["base_lr"], t["lr_base_batch"]) == (
        7,
        2,
        2e-3,
        64,
    )  # lr unscaled
    assert (a["crop_scale"], a["auto_augment"], a["reprob"], a["mixup"], a["label_smoothing"]) == (
        [0.6, 1.0],
        None,
        0.0,
        0.0,
        0.1,
    )
    assert (cfg["amp"], cfg["save_freq"], cfg["eval"]["crop_pct"]) == ("none", 1, 1.0)
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_generated_set_is_balanced_and_the_same_on_every_call(bt, trainerbench, tmp_path):
    assert trainerbench.shapes.split_counts(497, 10) == [50] * 7 + [49] * 3
    assert sum(trainerbench.shapes.split_counts(1300, 10)) == 1300
    a = bt.ensure_dataset(tmp_path / "a", train=23, val=12)
    b = bt.ensure_dataset(tmp_path / "b", train=23, val=12)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 35 and len(list((a / "train").iterdir())) == 10 == len(
        trainerbench.shapes.class_names()
    )
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert bt.count_images(a / "train") == 23 and bt.count_images(a / "val") == 12
    stamp = (a / "meta.json").stat().st_mtime_ns
    bt.ensure_dataset(tmp_path / "a", train=23, val=12)  # reused, not redrawn
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a generated set")
    with pytest.raises(DataError, match="not a set generated by this script"):
        bt.ensure_dataset(tmp_path / "mine", train=23, val=12)


def test_both_trainers_results_are_parsed(trainerbench, tmp_path):
    summary = tmp_path / "summary.csv"
    summary.write_text(
        "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n"
        "0,2.3,2.2,31.25,80.0,0.002\n1,1.9,1.8,56.5,95.5,0.001\n"
    )
    rows = trainerbench.results.read_timm_summary(summary)
    assert [r["top1"] for r in rows] == [0.3125, 0.565] and rows[1]["top5"] == 0.955
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {
            "epoch": e,
            "train_loss": 2.0 - e,
            "val_loss": 1.5,
            "val_top1": [0.4, 0.5, 0.6][e],
            "val_top5": 0.9,
            "train_img_s": 100.0 + e,
        }
        for e in range(3)
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    parsed = trainerbench.results.read_swin_metrics(metrics)
    assert [r["top1"] for r in parsed] == [0.4, 0.5, 0.6] and [r["train_img_s"] for r in parsed] == [
        100,
        101,
        102,
    ]
    log = (
        "Train: 0 [   0/20 (  5%)]  Loss: 2.34 (2.34)  Time: 12.117s,    5.28/s  (12.117s,    5.28/s)  LR: 1e-05\n"
        "Train: 0 [  19/20 (100%)]  Loss: 2.28 (2.38)  Time: 0.586s,  109.21/s  (0.601s,  106.49/s)  LR: 2e-03\n"
        "Train: 1 [  19/20 (100%)]  Loss: 2.30 (2.35)  Time: 0.500s,  128.00/s  (0.512s,  125.00/s)  LR: 2e-05\n"
    )
    assert trainerbench.results.timm_train_img_s(log) == [106.49, 125.0]
    (tmp_path / "bad.csv").write_text("epoch,loss\n0,1\n")
    with pytest.raises(DataError, match="eval_top1"):
        trainerbench.results.read_timm_summary(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="cannot read swin-train's metrics"):
        trainerbench.results.read_swin_metrics(tmp_path / "missing.jsonl")


def fake_run(trainerbench, trainer, pair, wall, top1, *, exit_code=0, pss=1000.0):
    m = trainerbench.measure.Measurement(
        exit_code=exit_code, wall_s=wall, cpu_s=wall / 2, peak_tree_pss_mib=pss, peak_rss_mib=pss
    )
    epochs = [{"epoch": 0, "top1": top1 - 0.1}, {"epoch": 1, "top1": top1}]
    return trainerbench.results.summarize_trainer(
        trainer, pair, m, epochs, train_images=1280, epochs_planned=2, loop_img_s=[100.0]
    )


def test_pairs_alternate_and_ratios_are_medians_of_pairwise_ratios(bt, trainerbench):
    assert bt.pair_order(3, ["swin", "timm"]) == [
        (0, "swin"),
        (0, "timm"),
        (1, "timm"),
        (1, "swin"),
        (2, "swin"),
        (2, "timm"),
    ]
    runs = [
        fake_run(trainerbench, "swin", 0, 100.0, 0.8),
        fake_run(trainerbench, "timm", 0, 130.0, 0.7),
        fake_run(trainerbench, "swin", 1, 110.0, 0.8),
        fake_run(trainerbench, "timm", 1, 121.0, 0.75, pss=1100.0),
        fake_run(trainerbench, "swin", 2, 90.0, 0.9),
        fake_run(trainerbench, "timm", 2, 99.0, 0.8),
        fake_run(trainerbench, "swin", 3, 10.0, 0.9, exit_code=1),
        fake_run(trainerbench, "timm", 3, 99.0, 0.8),
    ]
    assert runs[6].error == "exit status 1" and runs[0].error is None
    assert runs[0].images_per_second == pytest.approx(2 * 1280 / 100.0)
    result = bt.compare(runs)
    ratios = result["ratios"]
    assert ratios["pairs"] == 3  # the pair with a failed run is left out
    assert ratios["speedup_wall"] == pytest.approx(statistics.median([1.3, 1.1, 1.1]))
    assert ratios["memory_tree_pss"] == pytest.approx(1.0)  # median of 1, 1/1.1, 1
    assert ratios["memory_rss"] == pytest.approx(1.0)
    assert ratios["top1_difference"] == pytest.approx(0.1)
    assert result["medians"]["swin"]["runs"] == 3 and result["medians"]["timm"]["wall_s"] == 110.0
    table = bt.format_table(runs, result)
    assert "1.100x faster than timm" in table and "exit status 1" in table


def test_a_measured_process_tree_counts_its_children(trainerbench, tmp_path):
    child = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); t = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    m = trainerbench.measure.run_measured(
        [sys.executable, "-c", parent],
        env=env_for_subprocess(),
        cwd=tmp_path,
        log_path=tmp_path / "log.txt",
        memory_interval=0.05,
    )
    assert m.exit_code == 0 and not m.timed_out
    assert m.cpu_s >= 0.6  # the child's CPU time, reaped by the parent
    assert m.peak_rss_mib >= 300 and m.peak_tree_pss_mib >= 300
    assert m.wall_s >= 1.0
    hung = trainerbench.measure.run_measured(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env=env_for_subprocess(),
        cwd=tmp_path,
        log_path=tmp_path / "hung.txt",
        timeout=1,
        memory_interval=0,
    )
    assert hung.timed_out and hung.exit_code == -9 and hung.wall_s < 30 and hung.peak_tree_pss_mib is None


def test_user_mistakes_are_one_line_errors(bt, tmp_path, capsys):
    cases = [
        (["--trainers", "timm"], "--timm-train PATH is needed"),
        (["--timm-train", str(tmp_path / "nope.py")], "no such file"),
        (["--trainers", "swin", "--epochs", "2", "--warmup-epochs", "2"], "warmup epochs < epochs"),
        (["--trainers", "swin", "--pairs", "0"], "--pairs must be >= 1"),
        (["--trainers", "swin", "--data", str(tmp_path)], "does not exist"),
    ]
    for argv, message in cases:
        assert bt.cli([*argv, "--work-dir", str(tmp_path / "work")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_tiny_run_of_both_trainers_end_to_end(bt, tmp_path, capsys):
    trainers = ["swin", "timm"] if TIMM_TRAIN else ["swin"]
    argv = [
        "--trainers",
        *trainers,
        "--pairs",
        "1",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--train-images",
        "70",
        "--val-images",
        "20",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--memory-interval",
        "1",
        "--work-dir",
        str(tmp_path),
        "--json",
    ]
    if TIMM_TRAIN:
        argv += ["--timm-train", TIMM_TRAIN]
    report = bt.main(argv)
    assert json.loads(capsys.readouterr().out)["recipe"]["epochs"] == 1
    assert [r["trainer"] for r in report["runs"]] == trainers
    for run in report["runs"]:
        assert run["error"] is None, Path(run["log"]).read_text()[-3000:]
        m = run["measurement"]
        assert m["wall_s"] > 0 and m["cpu_s"] > 0 and m["peak_tree_pss_mib"] > 100 and m["peak_rss_mib"] > 100
        assert len(run["epochs"]) == 1 and 0 <= run["best_top1"] <= 1
        assert run["images_per_second"] == pytest.approx(64 / m["wall_s"])  # 2 full batches of 32, 1 epoch
    assert (tmp_path / "runs" / "swin-0" / "out" / "last.pth").is_file()
    if TIMM_TRAIN:
        assert report["ratios"]["pairs"] == 1 and report["ratios"]["speedup_wall"] > 0
