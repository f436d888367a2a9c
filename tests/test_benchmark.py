"""Smoke test of scripts/benchmark.py on a micro model: report schema, pairwise ratios, same weights.

No timing assertions: the numbers depend on the machine; only how they are derived is checked.
"""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
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
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_data_loader_mode_reports_img_s_per_worker(bench, tmp_path, capsys):
    for i in range(3):
        (tmp_path / "class_a").mkdir(exist_ok=True)
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(tmp_path / "class_a" / f"{i}.png")
    argv = ["--data-loader", str(tmp_path), "--workers", "0", "1", "--repeats", "2", "--data-images", "4"]
    report = bench.main(argv + ["--batch-size", "2", "--img-size", "32", "--json"])
    assert json.loads(capsys.readouterr().out) == report
    assert report["config"]["num_images"] == 3 and "RandAugment" in report["config"]["transform"]
    for workers, res in report["results"].items():
        assert len(res["img_s"]) == 2 and res["median_img_s"] == statistics.median(res["img_s"])
        assert res["per_worker_img_s"] == res["median_img_s"] / max(int(workers), 1)
        assert res["cpu_ms_per_image"] > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no JPEG/PNG images"):
        bench.main(["--data-loader", str(tmp_path / "empty"), "--workers", "0"])


def test_data_loader_mode_compares_the_folder_with_its_shards(bench, tmp_path, capsys):
    from swin_train.data.pack import PackOptions, pack

    for split, count in (("train", 4), ("val", 2)):
        for name in ("a", "b"):
            (tmp_path / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (48, 40), (60 * i, 90, 200)).save(
                    tmp_path / "src" / split / name / f"{i}.jpg"
                )
    pack(tmp_path / "src", tmp_path / "wds", PackOptions(shard_size=2), progress=False)
    argv = ["--data-loader", str(tmp_path / "src" / "train"), "--data-shards", str(tmp_path / "wds")]
    report = bench.main(
        argv + ["--workers", "0", "2", "--repeats", "1", "--data-images", "4", "--batch-size", "2"]
    )
    for res in report["results"].values():
        assert res["file_opens_per_epoch"] == 8 and res["shards"]["file_opens_per_epoch"] == 4
        assert res["cpu_ms_per_image"] > 0 and res["shards"]["cpu_ms_per_image"] > 0
    table = capsys.readouterr().out
    assert "CPU ms/img" in table and "shards: 4 file opens per epoch" in table


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
