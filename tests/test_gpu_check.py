"""scripts/gpu_check.py without a GPU: the dry run, the no-GPU error, test discovery, output parsing, the
part runner's budgets, and the report writer (valid markdown and strict JSON from fake part results)."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import env_for_subprocess, load_module, script_parts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    yield load_module("gpu_check", SCRIPT)
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def gpucheck(gc):
    return script_parts("gpucheck", "running", "cuda_tests", "preempt_resume", "benchmarks")


def context(gc, tmp_path, budget=60.0):
    return gc.Context(
        out=tmp_path,
        python=sys.executable,
        num_gpus=2,
        models=["T", "B", "L"],
        batch_size=128,
        loader_workers=[1, 2],
        deadline=time.monotonic() + budget,
    )


def test_dry_run_lists_every_part_and_the_report_path_and_runs_nothing(gc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "visible_gpus", lambda: 0)  # a dry run needs no GPU
    out = tmp_path / "report"
    assert gc.cli(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for part in (
        "cuda_tests",
        "preempt_resume",
        "bench_eager",
        "data_loader",
        "device_pipeline",
        "bench_flex",
        "bench_compiled",
    ):
        assert f"## {part}:" in text
    assert "-m pytest" in text and "tests/test_" in text
    assert "torch.distributed.run" in text and "data.synthetic=true" in text and "SIGTERM" in text
    for model in (
        "swin_tiny_patch4_window7_224",
        "swin_base_patch4_window7_224",
        "swin_large_patch4_window7_224",
    ):
        assert text.count(f"--model {model}") == 3  # eager, flex, compiled
    assert text.count("--attention flex") == 3 and text.count("--compile ours") == 3
    assert "--dtype bf16 --batch-size 128" in text and "--data-loader" in text
    # device_pipeline: the loader benchmark with the device work on the GPU
    assert re.search(r"--device cuda --workers [0-9 ]+ --batch-size 64", text)
    assert f"# report: {out / 'report.md'} and {out / 'report.json'}" in text
    assert not out.exists()


def test_without_a_gpu_it_prints_one_line_and_exits_2(tmp_path):
    out = tmp_path / "report"
    wrapper = SCRIPT.with_suffix(".sh")  # the one command a GPU machine runs
    done = subprocess.run(
        ["bash", str(wrapper), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable),
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU visible; ")
    assert not out.exists()


def test_cuda_tests_are_found_by_their_skipif_marks(gpucheck, tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        "import pytest, torch\nCUDA = torch.cuda.is_available()\n\n"
        '@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")\ndef test_on_gpu(): pass\n\n'
        '@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")\n'
        "def test_without_gpu(): pass\n\n"
        '@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx")\ndef test_onnx(): pass\n\n'
        "class TestGroup:\n"
        '    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")\n'
        "    def test_method(self): pass\n"
    )
    (tests / "test_c.py").write_text(
        'import pytest\nneeds_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")\n\n'
        "@needs_gpu\ndef test_aliased(): pass\n\ndef test_plain(): pass\n"
    )
    (tests / "test_b.py").write_text(
        'import pytest, torch\npytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")]\n'
        "def test_x(): pass\n"
    )
    (tests / "helpers.py").write_text('@pytest.mark.skipif(not CUDA, reason="CUDA")\ndef test_no(): pass\n')
    assert gpucheck.cuda_tests.cuda_test_ids(tests) == [
        "tests/test_a.py::test_on_gpu",
        "tests/test_a.py::TestGroup::test_method",
        "tests/test_b.py",
        "tests/test_c.py::test_aliased",
    ]


def test_the_repositorys_cuda_tests_are_found(gpucheck):
    ids = gpucheck.cuda_tests.cuda_test_ids(SCRIPT.parents[1] / "tests")
    assert ids
    for node in ids:
        path, _, name = node.partition("::")
        assert (SCRIPT.parents[1] / path).is_file()
        assert not name or f"def {name.split('::')[-1]}(" in (SCRIPT.parents[1] / path).read_text()


def test_torchrun_failure_report_and_pytest_summary_are_parsed(gpucheck):
    torchrun_output = (
        "E1202 api.py:1002] failed (exitcode: 143) local_rank: 0 (pid: 30011) of binary: python\n"
        "Failures:\n[1]:\n  time      : 2026-12-02_01:35:27\n  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : -15 (pid: 30012)\n  error_file: <N/A>\n"
        "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
        "  exitcode  : 143 (pid: 30011)\n"
    )
    assert gpucheck.preempt_resume.worker_exit_codes(torchrun_output) == [-15, 143]
    assert gpucheck.cuda_tests.pytest_counts("....\n3 passed, 1 skipped, 2 deselected in 12.31s\n") == {
        "passed": 3,
        "skipped": 1,
        "deselected": 2,
    }
    assert gpucheck.cuda_tests.pytest_counts("1 failed, 2 passed in 3.0s") == {"failed": 1, "passed": 2}
    assert gpucheck.cuda_tests.pytest_counts("no tests ran") == {}


def test_steps_keep_to_their_budget_and_a_failing_part_does_not_stop_the_check(gc, gpucheck, tmp_path):
    ctx = context(gc, tmp_path)
    quick = gpucheck.running.Step("quick", [sys.executable, "-c", "print('ok')"], 30)
    slow = gpucheck.running.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    done, late = gpucheck.running.run_step(quick, ctx), gpucheck.running.run_step(slow, ctx)
    assert (done.exit_code, done.timed_out) == (0, False) and Path(done.stdout).read_text() == "ok\n"
    assert late.timed_out and late.seconds < 30
    assert (
        gpucheck.running.step_status([done]) == "passed"
        and gpucheck.running.step_status([done, late]) == "timed out"
    )

    def broken(ctx, steps):
        raise RuntimeError("nvidia-smi missing")

    result = gc.run_part(gc.Part("broken", "A part that raises", lambda ctx: [quick], broken), ctx)
    assert result.status == "failed" and "RuntimeError: nvidia-smi missing" in result.summary

    # too little time left: recorded, not started
    ctx.deadline = time.monotonic() + gpucheck.running.MIN_STEP_S / 2
    skipped = gpucheck.running.run_step(quick, ctx)
    assert skipped.exit_code is None and "budget" in skipped.tail
    assert gpucheck.running.step_status([skipped]) == "skipped"


def fake_bench_report(model: str, ours: float, timm: float) -> dict:
    def mode(img_s, mfu, mem):
        return {"median_img_s": img_s, "mfu": mfu, "peak_mem_mib": mem}

    return {
        "config": {"model": model, "compile": [], "attention": "auto"},
        "results": {
            "ours": {
                "train": mode(ours, 0.41, 20000.0),
                "infer": mode(3 * ours, 0.35, 4000.0),
                "compile_s": None,
            },
            "timm": {
                "train": mode(timm, None, 21000.0),
                "infer": mode(3 * timm, 0.3, 4200.0),
                "compile_s": None,
            },
        },
        "ratios": {"ours/timm": {"train": {"median": ours / timm}, "infer": {"median": 1.02}}},
    }


def test_report_writer_produces_valid_markdown_and_strict_json(gc, gpucheck, tmp_path):
    rows = [gpucheck.benchmarks.bench_row(fake_bench_report("swin_tiny_patch4_window7_224", 3000.0, 2500.0))]
    bench = gpucheck.running.PartResult(
        "bench_eager",
        "Model benchmark, eager",
        "passed",
        42.0,
        250,
        "T train 3000 img/s",
        [
            gpucheck.running.StepResult(
                "bench_eager_T",
                "python scripts/benchmark.py --json",
                0,
                40.0,
                stdout="/x.out",
                tail="never shown: the part passed",
            )
        ],
        {"rows": rows},
    )
    loader = gpucheck.running.PartResult(
        "data_loader",
        "Data loader",
        "passed",
        20.0,
        90,
        "250 img/s per worker",
        [],
        {"per_worker_img_s": {"1": 250.0, "2": 240.0}, "img_s": {"1": 250.0, "2": 480.0}, "img_size": 224},
    )
    failed = gpucheck.running.PartResult(
        "preempt_resume",
        "SIGTERM | resume",
        "failed",
        60.0,
        300,
        "worker exit codes [1]",
        [
            gpucheck.running.StepResult(
                "train_until_sigterm",
                "torchrun ...",
                1,
                55.0,
                tail="Traceback\n```\nRuntimeError: NCCL | boom",
            )
        ],
        {"worker_exit_codes": [1], "ratio": math.nan},
    )
    skipped = gpucheck.running.PartResult(
        "bench_compiled",
        "Compiled",
        "skipped",
        0.0,
        600,
        "not run: the overall --budget is spent",
        [gpucheck.running.StepResult("bench_compiled_T", "python ...", None, 0.0, tail="not run")],
    )
    report = {
        "tool": "gpu_check",
        "started": "2026-12-02T01:00:00+00:00",
        "elapsed_s": 300.5,
        "budget_s": 560,
        "environment": {
            "host": "gpu-1",
            "gpus": [{"index": 0, "name": "NVIDIA H200", "memory_mib": 143771}],
            "torch": "2.14.1",
            "cuda": "12.8",
        },
        "parts": [bench, loader, failed, skipped],
        "loader_cores": gc.loader_cores(loader.data, [bench], num_gpus=1),
    }
    md_path, json_path = gc.write_report(report, tmp_path / "out")

    def no_nan(name):
        raise ValueError(f"{name} in strict JSON")

    data = json.loads(json_path.read_text(), parse_constant=no_nan)
    assert [p["name"] for p in data["parts"]] == [
        "bench_eager",
        "data_loader",
        "preempt_resume",
        "bench_compiled",
    ]
    assert [p["status"] for p in data["parts"]] == ["passed", "passed", "failed", "skipped"]
    assert data["parts"][2]["data"]["ratio"] is None
    assert data["parts"][0]["data"]["rows"][0]["train_vs_timm"] == pytest.approx(1.2)
    assert data["loader_cores"][0]["cores_needed_per_gpu"] == pytest.approx(3000.0 / 250.0)

    md = md_path.read_text()
    lines = md.splitlines()
    assert [line for line in lines if line.startswith("# ")] == ["# GPU check: gpu-1"]
    for part in ("bench_eager", "data_loader", "preempt_resume", "bench_compiled"):
        assert any(line.startswith(f"## {part}: ") for line in lines)
    fences = [line for line in lines if line.startswith("```")]
    assert len(fences) % 2 == 0 and set(fences[::2]) == {"```text"} and set(fences[1::2]) == {"```"}
    inside, table = False, None
    for line in lines:  # every table row has as many cells as its header (escaped pipes are not separators)
        if line.startswith("```"):
            inside = not inside
            continue
        if inside or not line.startswith("|"):
            table = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        table = table or cells
        assert cells == table, line
    assert "RuntimeError: NCCL | boom" in md  # a failed part's output, verbatim in a fence
    assert "never shown" not in md  # a passed part's output is left out
    assert "| swin_tiny_patch4_window7_224 | 3000.0 | 2500.0 | 1.200x |" in md
    assert "| 41.0% / n/a |" in md  # timm's train MFU is unknown
    assert "| bench_compiled | skipped | 0 s / 600 s |" in md
    assert "## CPU cores one GPU needs" in md and "| 12.0 |" in md


def test_check_runs_parts_in_order_within_budgets_and_reports_failures(
    gc, gpucheck, tmp_path, monkeypatch, capsys
):
    def plan(code, budget):
        return lambda ctx: [gpucheck.running.Step("step", [sys.executable, "-c", code], budget)]

    def run(ctx, steps):
        results = [gpucheck.running.run_step(s, ctx) for s in steps]
        return gpucheck.running.step_status(results), "ran", {}, results

    parts = (
        gc.Part("ok", "Passes", plan("print(1)", 30), run),
        gc.Part("hangs", "Runs past its budget", plan("import time; time.sleep(60)", 1), run),
        gc.Part("fails", "Exits 3", plan("raise SystemExit(3)", 30), run),
    )
    monkeypatch.setattr(gc, "PARTS", parts)
    monkeypatch.setattr(gc, "PART_NAMES", tuple(p.name for p in parts))
    monkeypatch.setattr(gc, "visible_gpus", lambda: 1)
    assert gc.main(["--out", str(tmp_path), "--budget", "120"]) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert [(p["name"], p["status"]) for p in data["parts"]] == [
        ("ok", "passed"),
        ("hangs", "timed out"),
        ("fails", "failed"),
    ]
    assert data["parts"][1]["seconds"] < 30
    assert (tmp_path / "report.md").is_file()
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out


def test_dry_run_for_a_16_core_machine_plans_no_part_past_the_budget_and_sizes_loader_sets(
    gc, tmp_path, capsys
):
    assert gc.cli(["--dry-run", "--out", str(tmp_path), "--workers", "1", "2", "4", "8"]) == 0
    text = capsys.readouterr().out
    planned = [int(b) for b in re.findall(r"^## \w+: .* \(budget (\d+) s\)$", text, re.MULTILINE)]
    skipped = re.findall(r"^## (\w+): .* \(skipped: needs \d+ s, over the budget\)$", text, re.MULTILINE)
    assert len(planned) + len(skipped) == len(gc.PARTS) and planned and skipped
    assert sum(planned) <= 560 - gc.MARGIN_S
    # every skipped part is in a further call that fits the same budget (bench_compiled alone: at most 600 s)
    calls = re.search(r"^# skipped parts, in further calls: (.*)$", text, re.MULTILINE).group(1)
    called = [part for call in calls.split(";") for part in re.findall(r"--parts ((?:\w+ ?)+)", call)]
    assert sorted(" ".join(called).split()) == sorted(skipped) and "--budget" not in calls
    # a loader set gives the widest worker count (8) as many timed batches as warm-up ones
    for batch, images in re.findall(
        r"--batch-size (\d+) --data-images \d+ .*after writing (\d+) JPEGs", text
    ):
        assert int(images) >= 2 * 8 * int(batch)


def test_a_part_that_no_longer_fits_the_budget_is_skipped_not_started(gc, gpucheck, tmp_path, monkeypatch):
    def plan(name, budget):
        return lambda ctx: [
            gpucheck.running.Step(name, [sys.executable, "-c", f"open('{tmp_path / name}', 'w')"], budget)
        ]

    def run(ctx, steps):
        results = [gpucheck.running.run_step(s, ctx) for s in steps]
        return gpucheck.running.step_status(results), "ran", {}, results

    parts = (
        gc.Part("first", "Fits", plan("first", 20), run),
        gc.Part("big", "Needs more than is left", plan("big", 55), run),
        gc.Part("small", "Fits in what is left", plan("small", 20), run),
    )
    monkeypatch.setattr(gc, "PARTS", parts)
    monkeypatch.setattr(gc, "PART_NAMES", tuple(p.name for p in parts))
    monkeypatch.setattr(gc, "visible_gpus", lambda: 1)
    assert gc.main(["--out", str(tmp_path / "out"), "--budget", "60"]) == 0  # a skipped part is no failure
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(p["name"], p["status"]) for p in data["parts"]] == [
        ("first", "passed"),
        ("big", "skipped"),
        ("small", "passed"),
    ]
    assert data["parts"][1]["summary"].startswith("not run: needs 55 s") and not (tmp_path / "big").exists()


def test_the_loader_benchmark_waits_for_the_gpu_before_it_reads_the_clock(gc, monkeypatch):
    import torch
    from bench import data_loader
    from bench.loader_rows import DeviceClock, Pipeline

    events = []
    monkeypatch.setattr(data_loader, "synchronize", lambda device: events.append(f"sync {device.type}"))
    monkeypatch.setattr(
        data_loader.time, "perf_counter", lambda: events.append("clock") or float(len(events))
    )
    batches = [(torch.zeros(4, 3, 2, 2), torch.zeros(4)) for _ in range(6)]
    loader = SimpleNamespace(_iterator=None)
    pipeline = Pipeline(lambda epoch: iter(batches), loader, DeviceClock())
    data_loader.timed_round(pipeline, images=16, workers=2, device=torch.device("cuda"))
    assert events == ["sync cuda", "clock", "sync cuda", "clock"]  # started and stopped on an idle GPU
