"""Training on CPU: each micro-batch's forward and backward split into parts that run at once, one thread each.

Why our own: torch runs a CPU step as one op after another, each spread over the intra-op threads. A small
model's ops are too short for that to pay: the threads meet at a barrier after every op, and a busy data
worker stalls them all. Here the batch is cut into `parts` slices and each slice's forward and backward runs
on its own thread with `threads // parts` intra-op threads (torch releases the GIL inside every op, and the
autograd engine runs a CPU backward on the thread that calls it). Each part's gradients come back to the
main thread (`torch.autograd.grad`), which adds them into `.grad` in part order: threads adding into `.grad`
themselves would sum in whichever order they finish, and float sums in another order differ in the last
bits, so a run would not repeat. `python scripts/benchmark.py --cpu-split N` times a step with N parts;
README has the numbers.

What it changes: the losses are per-sample means, so the whole batch's loss is the parts' losses weighted
by their share of the batch. Stochastic depth draws each part's masks from a generator of its own, seeded
from the default generator in the main thread (`stochastic_depth_generator`), so a run still repeats
exactly and resumes bitwise. Dropout and activation checkpointing draw from, or restore, the default
generator, which the threads share, so they turn the split off (as do DDP, torch.compile and non-CPU devices).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch

from swin_train.errors import ConfigError
from swin_train.models.swin import stochastic_depth_generator

# auto: no part smaller than this many images (smaller slices leave the matmuls too thin to gain)
MIN_IMAGES_PER_PART = 16


def choose_parts(
    requested: int,
    *,
    device_type: str,
    distributed: bool,
    compiled: bool,
    grad_checkpointing: bool,
    dropout: bool,
    batch_size: int,
    threads: int,
) -> tuple[int, str]:
    """How many parts each micro-batch is split into, and why (for the run summary). `requested`:
    `train.cpu_split` (0: auto, 1: off, n: n parts). An explicit n > 1 that cannot apply is a ConfigError."""
    blockers = [
        (device_type != "cpu", f"the device is {device_type}"),
        (distributed, "DDP runs one process per part of the batch already"),
        (compiled, "train.compile traces one graph per step"),
        (grad_checkpointing, "model.grad_checkpointing restores the shared generator in the recompute"),
        (dropout, "dropout draws from the generator the threads share"),
    ]
    reasons = [why for blocked, why in blockers if blocked]
    if requested == 1:
        return 1, "off (train.cpu_split: 1)"
    if reasons:
        if requested > 1:
            raise ConfigError(
                f"train.cpu_split={requested} cannot apply: {reasons[0]}; set train.cpu_split: 0 (auto) or 1"
            )
        return 1, f"off: {reasons[0]}"
    if requested > 1:
        if requested > batch_size:
            raise ConfigError(
                f"train.cpu_split={requested} is more parts than data.batch_size={batch_size} has images; "
                f"set train.cpu_split to at most {batch_size}"
            )
        return requested, f"{requested} parts at once, {max(1, threads // requested)} intra-op thread(s) each"
    parts = max(1, min(threads, batch_size // MIN_IMAGES_PER_PART))
    if parts == 1:
        return 1, f"off: {threads} intra-op thread(s) at batch {batch_size}"
    return parts, f"{parts} parts at once, {threads // parts} intra-op thread(s) each (auto)"


def eval_parts(requested: int, *, device_type: str, distributed: bool, batch_size: int, threads: int) -> int:
    """The parts of an evaluation batch: as `choose_parts`, but nothing random runs in evaluation, so only the
    device, DDP and the batch size limit it (the trainer's evaluation and swin-eval split alike). Where the
    device or DDP rules a split out, whole batches, not an error: swin-eval reads train.cpu_split from the
    training run's config, and a CPU run's checkpoint is evaluated on a GPU or under torchrun too."""
    if requested == 1 or device_type != "cpu" or distributed:
        return 1
    free = dict(compiled=False, grad_checkpointing=False, dropout=False)
    kw = dict(device_type=device_type, distributed=distributed, batch_size=batch_size, threads=threads)
    return choose_parts(min(requested, batch_size), **free, **kw)[0]


def evaluation_split(
    requested: int, *, device_type: str, distributed: bool, batch_size: int, reuse: CpuSplit | None = None
) -> CpuSplit | None:
    """The split evaluation runs with (None: whole batches): `eval_parts` over torch's intra-op threads, `reuse`
    when it has that many parts. One rule for the trainer's evaluation and swin-eval, so their numbers agree."""
    threads = torch.get_num_threads()
    parts = eval_parts(
        requested, device_type=device_type, distributed=distributed, batch_size=batch_size, threads=threads
    )
    if parts == 1:
        return None
    return reuse if reuse is not None and reuse.parts == parts else CpuSplit(parts, threads)


class CpuSplit:
    """A pool of `parts` threads, each with `threads // parts` intra-op threads (at least one), that runs
    `fn(images, targets, share)` on slices of a batch at once (module docstring)."""

    def __init__(self, parts: int, threads: int):
        self.parts = parts
        self.threads_per_part = max(1, threads // parts)
        self._pool = ThreadPoolExecutor(parts, thread_name_prefix="cpu-split")
        main_threads = torch.get_num_threads()
        ready = threading.Barrier(parts)
        # every pool thread sets its own intra-op threads (OpenMP's count is per thread); the barrier makes
        # each of the `parts` calls land on a different thread
        list(self._pool.map(lambda _: self._init_thread(ready), range(parts)))
        torch.set_num_threads(main_threads)  # set_num_threads also changes the default for new threads

    def _init_thread(self, ready: threading.Barrier) -> None:
        torch.get_num_threads()  # torch sets a thread's count on its first parallel op: do that first
        torch.set_num_threads(self.threads_per_part)
        ready.wait()

    @contextmanager
    def main_thread_share(self) -> Iterator[None]:
        """Inside, the calling thread runs its own ops with a part's intra-op threads (restored on the way out).

        What the main thread runs between the parts (normalising the next batch, adding the parts' gradients,
        the optimizer step, the evaluation's top-k) is short elementwise work. Spread over more threads, each
        of those ops waits at a barrier for a thread that a data worker may have pushed off its core, and the
        wait is longer than the op (README, Performance)."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads_per_part)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def run(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
        images: torch.Tensor,
        targets: torch.Tensor,
        params: list[torch.Tensor],
    ) -> torch.Tensor:
        """Forward and backward of a batch in parts. `fn(images, targets, share)` -> (loss, what to
        backpropagate) for one part, share = part size / batch size; the gradients of the latter with respect
        to `params` are added into their `.grad` in part order. Returns sum over parts of share * loss: the
        batch's loss when `fn`'s loss is a per-sample mean."""
        n = min(self.parts, len(images))
        seeds = torch.randint(2**62, (n,)).tolist()  # from the default generator: restored on resume
        batch = len(images)

        def part(i: int, x: torch.Tensor, y: torch.Tensor):
            with stochastic_depth_generator(torch.Generator().manual_seed(seeds[i])):
                share = len(x) / batch
                loss, objective = fn(x, y, share)
                return loss * share, torch.autograd.grad(objective, params, allow_unused=True)

        parts = zip(images.tensor_split(n), targets.tensor_split(n))
        results = self._results([self._pool.submit(part, i, x, y) for i, (x, y) in enumerate(parts)])
        for _, grads in results:  # in part order, whatever order the threads finished in
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return torch.stack([loss for loss, _ in results]).sum()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
        """[fn(part) for each part of `images`], the parts run at once (evaluation)."""
        n = min(self.parts, len(images))
        return self._results([self._pool.submit(fn, x) for x in images.tensor_split(n)])

    @staticmethod
    def _results(futures: list) -> list:
        wait(futures)  # every part finished (or failed) before the caller or its error handler goes on
        return [f.result() for f in futures]  # raises the first part's error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
