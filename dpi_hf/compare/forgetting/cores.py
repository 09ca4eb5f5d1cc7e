"""A's importance at θ_A, the cores selected from it, the controls of the same size, and the protection artifacts
the B runs read through ``protect_cores_from``.

The importance comes from the trainer's own probe path (:func:`dpi_hf.trainer.protection.probe_cores` with
``save_importance=True``): the recipe's probe settings, exactly as a DPI run's probes use them. It is stored once per
(pair, seed) as ``dpi/importance.safetensors`` and every core size p, and EWC's weights, come from that one file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ...core.copying import independent_copy

__all__ = ["Cores", "probe_args"]

IMPORTANCE_FILE = "importance.safetensors"


def probe_args(training: dict, output_dir: Path, seed: int, core_fraction: float):
    """The DPIConfig of a probe at θ_A: the recipe's fields (its probe settings among them), the core size p, and
    ``save_importance`` so that the importance is written next to the cores."""
    from ...trainer.config import DPIConfig

    return DPIConfig(**{**training, "save_strategy": "no", "report_to": [], "output_dir": str(output_dir),
                        "overwrite_output_dir": True, "seed": seed, "core_fraction": core_fraction,
                        "save_importance": True})


class Cores:
    """The cores and controls of one (pair, seed), selected lazily and written as protection artifacts.

    Args:
        model_a: the A model (θ_A), never given to a Trainer (the probes run on a copy).
        tokenizer: its tokenizer.
        task: A's name; ``rows``: A's training rows (what the probe reads).
        training: the recipe's training fields (the probe settings among them).
        directory: where the probes and the artifacts go (``probe-<task>/``, ``cores/<name>/``).
        seed: the probe's seed, and the seed of the random controls.
        reference_fraction: the p of the controls and of EWC's core scope.
        selection: ``select_core``'s ``scope``, ``include`` and ``exclude`` (the recipe's ``core_scope``,
            ``core_include``, ``core_exclude``: a DPI run's selection).
        log: progress lines.
    """

    def __init__(self, model_a, tokenizer, task: str, rows, training: dict, directory: Path, seed: int,
                 reference_fraction: float, selection: dict, log=print):
        from ...core import model_fingerprint

        self.model_a, self.tokenizer, self.task, self.rows = model_a, tokenizer, task, rows
        self.training, self.directory, self.seed = training, Path(directory), seed
        self.reference_fraction = reference_fraction
        self.selection = selection
        self.log = log
        self.fingerprint = model_fingerprint(model_a)
        self._importance = None
        self._cores: dict = {}

    # ------------------------------------------------------------------------------------------------- probing
    def _probe(self, task: str, rows) -> Path:
        """``probe-<task>/`` with the core at the reference p and the stored importance (probed once; reused)."""
        from ...trainer.protection import probe_cores

        out = self.directory / f"probe-{task}"
        if (out / "dpi" / IMPORTANCE_FILE).is_file():
            return out
        self.log(f"[sequential] probing {task}'s importance at θ_A ({self.training.get('probe_steps', 'default')} "
                 "probe steps, the recipe's probe settings)")
        args = probe_args(self.training, out, self.seed, self.reference_fraction)
        # on a copy: the probe's Trainer patches its model's forward, and θ_A is deep-copied by every later run
        probe_cores(independent_copy(self.model_a), {task: rows}, args, processing_class=self.tokenizer)
        return out

    @property
    def importance(self) -> dict[str, torch.Tensor]:
        """A's stored importance (float32), probed on first use."""
        if self._importance is None:
            from ...artifacts import load_importance

            self._importance = load_importance(self._probe(self.task, self.rows), tasks=[self.task])[self.task]
        return self._importance

    def _select(self, importance, p: float):
        from ...core import select_core

        return select_core(importance, p, **self.selection)

    # ------------------------------------------------------------------------------------------------- cores
    def core(self, p: float):
        """A's core at p: the top p of the stored importance."""
        key = ("core", p)
        if key not in self._cores:
            self._cores[key] = self._select(self.importance, p)
        return self._cores[key]

    def control(self, method: str, other_task: str | None = None, other_rows=None):
        """A control of the size of A's core at the reference p: ``random`` (a seeded random subset of the
        considered elements), ``random_per_tensor`` (as many random elements of each tensor as the core has
        there), ``largest_theta`` (the largest |θ_A|), ``other_core`` (``other_task``'s core at θ_A, probed with
        the same settings)."""
        key = (method, other_task)
        if key in self._cores:
            return self._cores[key]
        p = self.reference_fraction
        g = torch.Generator().manual_seed(10_000 + self.seed)
        if method == "random":
            mask = self._select({n: torch.rand(t.shape, generator=g) for n, t in self.importance.items()}, p)
        elif method == "random_per_tensor":
            mask = random_per_tensor(self.core(p), g)
        elif method == "largest_theta":
            params = dict(self.model_a.named_parameters())
            mask = self._select({n: params[n].detach().abs() for n in self.importance}, p)
        elif method == "other_core":
            from ...artifacts import load_importance

            directory = self._probe(other_task, other_rows)
            mask = self._select(load_importance(directory, tasks=[other_task])[other_task], p)
        else:
            raise ValueError(f"unknown control {method!r}")
        self._cores[key] = mask
        return mask

    # ------------------------------------------------------------------------------------------------- artifacts
    def artifact(self, name: str, mask, label: str, p: float, with_importance: bool = False) -> str:
        """Write ``mask`` (of size p) as a DPI artifact ``cores/<name>/`` (task ``label``, θ_A's fingerprint) for
        ``protect_cores_from``; ``with_importance`` also places A's stored importance there (EWC's weights).
        Returns the directory."""
        from ...artifacts import save_dpi_artifacts
        from ...core.planning import plan_from_groups

        out = self.directory / "cores" / name
        target = out / "dpi" / IMPORTANCE_FILE
        if not (out / "dpi" / "cores.safetensors").is_file():
            plan = plan_from_groups({label: mask}, [[label]], tasks=[label], freeze=False, jaccard_threshold=0.0,
                                    stage_order="given")
            save_dpi_artifacts(out, {label: mask}, plan, fingerprint=self.fingerprint, core_fraction=p)
        if with_importance and not target.is_file():
            source = self._probe(self.task, self.rows) / "dpi" / IMPORTANCE_FILE
            try:
                os.link(source, target)  # the same bytes: no second copy on disk
            except OSError:
                shutil.copy2(source, target)
        return str(out)

    def release(self) -> None:
        """Free the importance and the cores (a model-sized float32 set each)."""
        self._importance = None
        self._cores.clear()


def random_per_tensor(core, generator: torch.Generator):
    """A random subset with exactly ``core``'s number of elements in each tensor (seeded by ``generator``)."""
    from ...core import CoreMask

    indices = {}
    for name in core.names():
        numel, k = core.numel(name), core.count(name)
        indices[name] = torch.randperm(numel, generator=generator)[:k]
    return CoreMask.from_indices(indices, core.shapes())
