"""Part cuda_tests: find the tests that skip without CUDA (by their skipif marks, read with ast) and run them
under pytest; a test that still skips on a GPU machine fails the part."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gpucheck.running import REPO, Context, Outcome, Step, run_step, step_status


def _is_cuda_skip(decorator: ast.expr) -> bool:
    """`pytest.mark.skipif(not <...>, reason="... CUDA ..." / "... GPU ...")`: skipped where CUDA is missing."""
    if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.skipif")):
        return False
    condition = decorator.args[0] if decorator.args else None
    reason = next((k.value for k in decorator.keywords if k.arg == "reason"), None)
    reason_text = reason.value if isinstance(reason, ast.Constant) and isinstance(reason.value, str) else ""
    negated = isinstance(condition, ast.UnaryOp) and isinstance(condition.op, ast.Not)
    return negated and bool(re.search(r"\bCUDA\b|\bGPU\b", reason_text))


def _marked(decorators: list[ast.expr], aliases: set[str]) -> bool:
    return any(_is_cuda_skip(d) or (isinstance(d, ast.Name) and d.id in aliases) for d in decorators)


def cuda_test_ids(tests_dir: Path) -> list[str]:
    """pytest node ids of the tests that skip without CUDA: test functions (or classes, or whole modules via
    `pytestmark`) marked `skipif(not ..., reason=...CUDA/GPU...)`, directly or through a module-level name
    (`needs_cuda = pytest.mark.skipif(...)`, then `@needs_cuda`), relative to the repository root."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(tests_dir.parent).as_posix()
        aliases = {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign) and _is_cuda_skip(n.value)
            for t in n.targets
            if isinstance(t, ast.Name) and t.id != "pytestmark"
        }

        module_marks = [
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
        ]
        marks = [m for v in module_marks for m in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v])]
        if any(_is_cuda_skip(m) for m in marks):
            ids.append(rel)
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test"):
                if _marked(node.decorator_list, aliases):
                    ids.append(f"{rel}::{node.name}")
                elif isinstance(node, ast.ClassDef):
                    ids += [
                        f"{rel}::{node.name}::{m.name}"
                        for m in node.body
                        if isinstance(m, ast.FunctionDef)
                        and m.name.startswith("test")
                        and _marked(m.decorator_list, aliases)
                    ]
    return ids


def plan_cuda_tests(ctx: Context) -> list[Step]:
    ids = cuda_test_ids(REPO / "tests")
    return [
        Step("pytest_cuda", [ctx.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *ids], 130)
    ]


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's final summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not lines:
        return {}
    return {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])
    }


def run_cuda_tests(ctx: Context, steps: list[Step]) -> Outcome:
    ids = [a for a in steps[0].argv if a.startswith("tests/")]
    if not ids:  # pytest without node ids would run the whole suite
        return "failed", "no test in tests/ is marked skipif(not ..., reason='...CUDA...')", {}, []
    results = [run_step(steps[0], ctx)]
    r = results[0]
    text = Path(r.stdout).read_text(errors="replace") if r.stdout else ""
    counts = pytest_counts(text)
    skipped = re.findall(r"SKIPPED \[\d+\] (.+)", text)
    data = {"tests": ids, "counts": counts, "skipped": skipped}
    status = step_status(results)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
    if status == "passed" and counts.get("skipped"):
        status = "failed"
        summary += f" (skipped on a GPU machine: {'; '.join(skipped) or 'see the log'})"
    return status, summary, data, results
