"""Smoke test of scripts/benchmark.py on a micro model: report schema, pairwise ratios, same weights.

No timing assertions: the numbers depend on the machine; only how they are derived is checked.
"""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import load_module
from PIL import Image

from swin_train import create_model
from swin_train.errors import ConfigError, DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
MICRO_FLAGS = [
    "--img-size",
    "32",
    "--patch-size",
    "2",
    "--embed-dim",
    "24",
    "--depths",
    "2",
    "2",
    "--num-heads",
    "2",
    "4",
    "--window-size",
    "4",
    "--num-classes",
    "10",
]
MICRO = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)


@pytest.fixture(scope="module")
def bench():
    return load_module("benchmark", SCRIPT)


# The parts of the benchmark (scripts/bench/) import once loading benchmark.py has put scripts/ on sys.path.
@pytest.fixture(scope="module")
def mfu_module(bench):
    return importlib.import_module("bench.mfu")


@pytest.fixture(scope="module")
def timing_module(bench):
    return importlib.import_module("bench.timing")


def test_micro_run_reports_rounds_medians_and_pairwise_ratios(bench, capsys):
    # 3 rounds (not 1) so that a median of pairwise ratios is a real check; one thread avoids OpenMP
    # spin-waiting on a shared 2-core machine.
    argv = MICRO_FLAGS + ["--batch-size", "2", "--warmup", "1", "--repeats", "3", "--iters", "1"]
    argv += ["--threads", "1", "--no-memory", "--json", "--impls", "ours", "timm", "torchvision"]
    argv += ["--peak-tflops", "0.05"]  # the measured CPU peak has its own test
    report = bench.main(argv)
    assert json.loads(capsys.readouterr().out) == report  # --json prints exactly the returned report

    assert report["config"]["impls"] == ["ours", "timm", "torchvision"]
    assert report["config"]["model"] is None  # architecture flags make it a custom model
    assert report["macs_per_image"] == create_model(**MICRO, num_classes=10).flops()
    env = report["env"]
    assert env["torch"] == torch.__version__ and env["threads"] == 1
    assert env["command"].startswith("scripts/benchmark.py --img-size 32")
    # same weights: timm's init converted into ours and into torchvision's layout
    assert set(report["logits_max_abs_diff"]) == {"timm", "torchvision"}
    assert max(report["logits_max_abs_diff"].values()) < 1e-5
    assert len({res["params"] for res in report["results"].values()}) == 1

    for res in report["results"].values():
        assert res["compile_s"] is None
        assert all(res[mode]["minor_faults_per_step"] >= 0 for mode in ("train", "infer"))
        for mode in ("train", "infer"):
            m = res[mode]
            assert len(m["round_s"]) == 3
            assert m["img_s"] == pytest.approx([2 * 1 / s for s in m["round_s"]])
            assert m["median_img_s"] == statistics.median(m["img_s"])
            assert m["peak_mem_mib"] is None  # --no-memory
            assert m["mfu"] == pytest.approx(
                bench.mfu(report["macs_per_image"], m["median_img_s"], 0.05, mode == "train")
            )
    assert set(report["ratios"]) == {"ours/timm", "ours/torchvision", "torchvision/timm"}
    for pair, by_mode in report["ratios"].items():
        a, b = pair.split("/")
        for mode, r in by_mode.items():
            expected = [
                x / y
                for x, y in zip(report["results"][a][mode]["img_s"], report["results"][b][mode]["img_s"])
            ]
            assert r["pairwise"] == pytest.approx(expected)
            assert r["median"] == statistics.median(r["pairwise"])

    assert (report["config"]["peak_tflops"], report["config"]["peak_source"]) == (0.05, "--peak-tflops")
    table = bench.format_table(report)
    assert "ours vs torchvision: train" in table
    timm_train = report["results"]["timm"]["train"]["mfu"]
    assert f"ceiling vs timm (a step at 100% MFU): train {1 / timm_train:.2f}x" in table
    assert [line.split()[0] for line in table.splitlines()[5:8]] == ["ours", "timm", "torchvision"]


def test_ratio_is_median_of_round_pairs_not_ratio_of_medians(timing_module):
    pairwise, median = timing_module.median_pairwise_ratio([1.0, 4.0, 9.0], [1.0, 8.0, 3.0])
    assert pairwise == [1.0, 0.5, 3.0] and median == 1.0  # medians would give 4 / 3


def test_peak_lookup_and_mfu(mfu_module):
    assert mfu_module.peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989.4
    assert mfu_module.peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.7
    assert mfu_module.peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67.0
    assert mfu_module.peak_tflops("NVIDIA H100 PCIe", "fp16", tf32=False) == 756.0
    assert mfu_module.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == 312.0
    assert mfu_module.peak_tflops("NVIDIA H200", "bf16", tf32=False) == 989.4
    assert mfu_module.peak_tflops("NVIDIA H100 NVL", "bf16", tf32=False) is None  # not in the table
    # Swin-T training at 1000 img/s on 989.4 TFLOP/s: 6 x 4.494 GMAC x 1000 / 989.4e12
    assert mfu_module.mfu(4_494_000_000, 1000.0, 989.4, train=True) == pytest.approx(0.027253, rel=1e-4)
    assert mfu_module.mfu(4_494_000_000, 1000.0, 989.4, train=False) == pytest.approx(0.027253 / 3, rel=1e-4)
    assert mfu_module.mfu(4_494_000_000, 1000.0, None, train=True) is None


def test_cpu_peak_is_measured_and_gpu_peak_looked_up(bench, mfu_module, monkeypatch):
    tflops = mfu_module.measured_matmul_tflops("fp32", size=128, repeats=2)
    assert 0 < tflops < 100  # a 2-core CPU does tens of GFLOP/s, far below 100 TFLOP/s
    monkeypatch.setattr(
        mfu_module, "measured_matmul_tflops", lambda dtype: {"fp32": 0.15, "bf16": 0.3}[dtype]
    )
    parse = bench.build_parser().parse_args
    setup = bench.resolve(parse(MICRO_FLAGS))
    peak, source = mfu_module.resolve_peak(parse(MICRO_FLAGS), setup, "AMD EPYC")
    assert peak == 0.15 and source.startswith("measured: fastest of 3 fp32 4096x4096")
    setup = bench.resolve(parse(MICRO_FLAGS + ["--dtype", "bf16"]))
    assert mfu_module.resolve_peak(parse(MICRO_FLAGS + ["--dtype", "bf16"]), setup, "AMD EPYC")[0] == 0.3
    args = parse(MICRO_FLAGS + ["--peak-tflops", "2.5"])
    assert mfu_module.resolve_peak(args, bench.resolve(args), "AMD EPYC") == (2.5, "--peak-tflops")


def test_memory_probe_reports_train_and_infer_peaks(bench):
    spec = dict(
        impl="timm",
        arch=MICRO,
        num_classes=10,
        drop_path=0.1,
        batch_size=2,
        dtype="fp32",
        threads=1,
        malloc="system",
    )  # the probe would otherwise tune this test process's malloc
    out = bench.memory_probe(dict(spec, steps=1))
    assert set(out) == {"infer", "train"}
    assert out["train"] >= out["infer"] >= 0  # VmHWM only grows


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "swin_tiny_patch4_window7"], "did you mean"),
        (MICRO_FLAGS[:-2] + ["--window-size", "3"], "does not split into 3-windows"),
        (["--impls", "timm", "torchvision"], "must include 'ours'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--grad-checkpointing"], "torchvision's Swin has no gradient checkpointing"),
        (["--attention", "flex"], "--attention flex needs a CUDA GPU"),
        (["--impls", "ours", "torchvision", "--compile", "timm"], "only implementations in --impls"),
    ],
)
def test_bad_settings_raise_config_error(bench, flags, message):
    with pytest.raises(ConfigError, match=message):
        bench.main(flags)


def test_data_loader_mode_times_timm_and_ours_side_by_side(bench, tmp_path, capsys):
    for i in range(3):
        (tmp_path / "class_a").mkdir(exist_ok=True)
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(tmp_path / "class_a" / f"{i}.jpg")
    argv = ["--data-loader", str(tmp_path), "--workers", "0", "1", "--repeats", "2", "--data-images", "4"]
    report = bench.main(
        argv + ["--batch-size", "1", "--img-size", "32", "--gpu-rate", "100", "50", "20", "--json"]
    )
    assert json.loads(capsys.readouterr().out) == report
    assert report["config"]["num_images"] == 3 and "FastRandomResizedCrop" in report["config"]["transform"]
    torchcodec = report["env"]["jpeg_decoder"] == "torchcodec"
    assert torchcodec == ("ours_torchvision" in report["results"]["0"]) and "torchcodec" in report["env"]
    rows = ("timm", "ours", "ours_device_augment", "ours_device_decode", "eval_timm", "eval_ours")
    for workers, res in report["results"].items():
        assert set(res) >= {*rows, "eval_ours_device_decode"}
        for name in rows:
            r = res[name]
            assert len(r["img_s"]) == 2 and r["median_img_s"] == statistics.median(r["img_s"])
            assert r["per_worker_img_s"] == r["median_img_s"] / max(int(workers), 1)
            assert r["cpu_ms_per_image"] == statistics.median(r["cpu_ms"]) > 0
            assert (
                r["cpu_ms_per_image"] >= r["main_process_ms_per_image"] >= r["device_work_ms_per_image"] > 0
            )
            # on the CPU the device work is left out of what feeding a GPU costs
            assert r["feed_ms_per_image"] == statistics.median(r["feed_ms"]) < r["cpu_ms_per_image"]
        ratios = [o / t for o, t in zip(res["ours"]["cpu_ms"], res["timm"]["cpu_ms"])]
        assert res["ours"]["cpu_vs_timm"] == statistics.median(ratios) and "cpu_vs_timm" not in res["timm"]
        feed = [o / t for o, t in zip(res["ours_device_decode"]["feed_ms"], res["timm"]["feed_ms"])]
        assert res["ours_device_decode"]["feed_vs_timm"] == statistics.median(feed)
        # TorchCodec (where it decodes) against torchvision's decoders: the same loaders, per-round ratios
        for ours in ("ours", "eval_ours") if torchcodec else ():
            tv = res[f"{ours}_torchvision"]
            ratios = [o / t for o, t in zip(res[ours]["cpu_ms"], tv["cpu_ms"])]
            assert (
                res[ours]["cpu_vs_torchvision"] == statistics.median(ratios)
                and "cpu_vs_torchvision" not in tv
            )
            assert tv["cpu_vs_timm"] > 0 and len(tv["cpu_ms"]) == 2
        assert res["eval_ours"]["cpu_vs_timm"] > 0 and res["median_img_s"] == res["ours"]["median_img_s"]
        # planning which samples take which op stays on the host: it is not device work
        assert (
            res["ours_device_augment"]["host_planning_ms_per_image"]
            > 0
            == res["ours"]["host_planning_ms_per_image"]
        )
    cores = report["cores_per_gpu"]
    assert cores["workers"] == 1 and cores["from"] == "feed_ms_per_image"
    assert cores["timm"]["swin_tiny"] == 100 * report["results"]["1"]["timm"]["feed_ms_per_image"] / 1000
    rows = {"timm", "ours", "ours_device_augment", "ours_device_decode"} | (
        {"ours_torchvision"} if torchcodec else set()
    )
    assert set(cores) == {"workers", "from", *rows}
    # --loader-rows: those rows and the timm rows they are compared with
    some = bench.main(argv[:-4] + ["--repeats", "1", "--data-images", "4", "--batch-size", "1", "--img-size",
                                   "32", "--loader-rows", "ours_device_decode", "eval_ours"])  # fmt: skip
    assert set(some["results"]["1"]) == {"timm", "ours_device_decode", "eval_timm", "eval_ours"}
    with pytest.raises(ConfigError, match="--loader-rows: no row ours_gpu; rows here: timm, ours"):
        bench.main(argv + ["--loader-rows", "ours_gpu"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no JPEG/PNG images"):
        bench.main(["--data-loader", str(tmp_path / "empty"), "--workers", "0"])


def test_data_loader_mode_makes_the_photo_set_and_times_its_shards(bench, tmp_path, capsys):
    photos = importlib.import_module("bench.photos")
    argv = ["--data-loader", str(tmp_path / "photos"), "--photos", "8", "--workers", "2", "--repeats", "1"]
    report = bench.main(argv + ["--data-images", "4", "--batch-size", "2", "--full-decode-row"])
    assert report["config"]["shards"] == str(tmp_path / "photos-wds") and report["config"]["num_images"] == 8
    assert set(report["results"]["2"]) >= {"ours_shards", "ours_full_decode"}
    table = capsys.readouterr().out
    assert "cores per GPU needed" in table and "ours_shards" in table and "feed GPU" in table
    assert "device work ran on this CPU (one thread) and would run on the GPU there" in table
    if report["env"]["jpeg_decoder"] == "torchcodec":
        assert (
            "JPEGs by torchcodec against torchvision's decoders (the _torchvision rows), 2 workers" in table
        )
    described = photos.describe(tmp_path / "photos")
    assert described["images"] == 8 + 6  # val: every photo once at least
    assert 300 <= described["short_side_p10_p90"][0] <= described["short_side_p10_p90"][1] <= 500


def test_photo_set_is_the_same_bytes_for_the_same_seed_and_cut_to_imagenet_sizes(bench, tmp_path):
    photos = importlib.import_module("bench.photos")
    a = photos.make_photo_set(tmp_path / "a", train=6, val=0, seed=1)
    b = photos.make_photo_set(tmp_path / "b", train=6, val=0, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 6 and {f.parts[1] for f in files} == set(photos.SOURCES)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
        with Image.open(a / f) as image:
            w, h = image.size
            assert 300 <= min(w, h) <= 500 and 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
            assert image.format == "JPEG" and not image.info.get("progressive")


def test_compile_subset_and_grad_checkpointing_settings(bench):
    parse = bench.build_parser().parse_args
    assert bench.resolve(parse(["--compile"])).compile == ("ours", "timm", "torchvision")  # all by default
    setup = bench.resolve(parse(["--compile", "ours", "--impls", "ours", "timm", "--grad-checkpointing"]))
    assert setup.compile == ("ours",) and setup.grad_checkpointing
    models = bench.build_same_weight_models(
        bench.resolve(parse(MICRO_FLAGS + ["--grad-checkpointing", "--impls", "ours", "timm"]))
    )
    assert all(layer.grad_checkpointing for m in models.values() for layer in m.layers)


def test_linear_kernel_mode_times_every_block_shape(bench, capsys):
    report = bench.main(
        MICRO_FLAGS + ["--linear-kernels", "--batch-size", "2", "--repeats", "1", "--iters", "1"]
    )
    shapes = [(r["rows"], r["in"], r["out"]) for r in report["results"]]
    # stage 1: 2 x 16 x 16 tokens of 24 channels (qkv, proj, fc1, fc2), merging 4C -> 2C, then stage 2
    assert shapes[:5] == [(512, 24, 72), (512, 24, 24), (512, 24, 96), (512, 96, 24), (128, 96, 48)]
    assert shapes[5:] == [(128, 48, 144), (128, 48, 48), (128, 48, 192), (128, 192, 48)]
    assert all(v > 0 for r in report["results"] for k, v in r.items() if k.endswith("_gflops"))
    assert "fwd oneDNN" in capsys.readouterr().out
    assert {r["forward_uses"] for r in report["results"]} == {"MKL"}  # 512 rows: too few for oneDNN
