"""Multi-task input for DPITrainer: tasks from a dict or a task column, their mixture, and the stage budget."""

from __future__ import annotations

import math
import re

import torch

from datasets import Dataset, DatasetDict, concatenate_datasets

from ..core.errors import DPIConfigError

DATA_COLUMNS = ("prompt", "completion", "messages", "text", "input_ids", "labels", "tools", "chat_template_kwargs")


def safe_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def split_tasks(dataset, task_column: str) -> dict[str, Dataset] | None:
    """Tasks of a multi-task training input, in first-appearance order, or None for a plain single dataset."""
    if dataset is None:
        return None
    if isinstance(dataset, (dict, DatasetDict)):
        if not dataset:
            raise DPIConfigError("train_dataset is an empty dict; pass at least one task's dataset.")
        for name, ds in dataset.items():
            if not isinstance(name, str) or not name:
                raise DPIConfigError(f"task name {name!r} must be a non-empty string.")
            if not isinstance(ds, Dataset):
                raise DPIConfigError(f"train_dataset[{name!r}] is a {type(ds).__name__}; pass a datasets.Dataset.")
            if len(ds) == 0:
                raise DPIConfigError(f"the dataset of task {name!r} is empty; give it examples or drop the task.")
        return dict(dataset)
    if isinstance(dataset, Dataset) and task_column in dataset.column_names:
        names = dataset[task_column]
        order = list(dict.fromkeys(names))
        if not order:
            raise DPIConfigError("train_dataset is empty; give it examples.")
        by_task: dict[str, list[int]] = {t: [] for t in order}
        for i, t in enumerate(names):
            by_task[t].append(i)
        return {str(t): dataset.select(idx) for t, idx in by_task.items()}
    return None



def mixture(tasks: dict[str, Dataset], task_column: str) -> Dataset:
    """One dataset of every task's rows (the SFT columns only) with a ``task_column`` naming each row's task."""
    parts = []
    for name, ds in tasks.items():
        keep = [c for c in ds.column_names if c in DATA_COLUMNS]
        ds = ds.select_columns(keep)
        parts.append(ds.add_column(task_column, [name] * len(ds)))
    return concatenate_datasets(parts)


def allocate_steps(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` optimizer steps over stages in proportion to ``sizes`` (largest remainder, each ≥ 1)."""
    if total < len(sizes):
        raise DPIConfigError(
            f"max_steps={total} is smaller than the number of stages ({len(sizes)}); give every stage a step."
        )
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    steps = [max(1, math.floor(r)) for r in raw]
    order = sorted(range(len(sizes)), key=lambda i: -(raw[i] - math.floor(raw[i])))
    i = 0
    while sum(steps) < total:
        steps[order[i % len(order)]] += 1
        i += 1
    while sum(steps) > total:
        j = max(range(len(steps)), key=lambda k: steps[k])
        steps[j] -= 1
    return steps


def split_halves(rows: Dataset, seed: int) -> list[Dataset]:
    """Two disjoint halves of ``rows`` (a seeded permutation, each half kept in row order) for split-half probes."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    mid = len(rows) // 2
    return [rows.select(sorted(order[:mid])), rows.select(sorted(order[mid:]))]


class AlternatingHalvesSampler(torch.utils.data.Sampler):
    """Row order of a one-pass split-half probe over ``concatenate([half_1, half_2])``: blocks of ``block`` rows that
    alternate between the two halves (block 0 from half 1, block 1 from half 2, ...), so that optimizer step s reads
    rows of half s mod 2 only and the two halves' importance accumulators see disjoint rows.

    Args:
        n1, n2: the halves' sizes (rows [0, n1) are half 1, [n1, n1 + n2) half 2).
        block: rows per optimizer step over all processes: per-device batch × gradient accumulation × world size
            (accelerate hands each process every world-size-th batch, so one step's rows are consecutive here).
        seed: seeds each half's row order; each pass (epoch) and each restart of an exhausted half draws a new order.

    One epoch is 2·⌈max(n1, n2) / block⌉ blocks (an even number of steps, so the alternation survives epochs); the
    smaller half starts its rows again, in a new order, when it runs out.
    """

    def __init__(self, n1: int, n2: int, block: int, seed: int = 0):
        if n1 < 1 or n2 < 1 or block < 1:
            raise ValueError(f"AlternatingHalvesSampler needs two non-empty halves and block >= 1 (got {n1}, {n2}, "
                             f"{block}).")
        self.sizes, self.block, self.seed = (n1, n2), block, seed
        self.blocks = 2 * -(-max(n1, n2) // block)
        self._epoch = 0

    def __len__(self) -> int:
        return self.blocks * self.block

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        offsets = (0, self.sizes[0])
        orders = [torch.randperm(n, generator=gen).tolist() for n in self.sizes]
        pos = [0, 0]
        for b in range(self.blocks):
            h = b % 2
            for _ in range(self.block):
                if pos[h] == self.sizes[h]:
                    orders[h], pos[h] = torch.randperm(self.sizes[h], generator=gen).tolist(), 0
                yield offsets[h] + orders[h][pos[h]]
                pos[h] += 1
