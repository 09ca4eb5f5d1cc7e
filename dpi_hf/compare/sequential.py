"""The sequential scenario: train task A, then task B with A's core protected, and measure what the protection buys.

For each pair (A, B) and each seed:

1. SFT on A from the base model (``max_steps``); the held-out NLL of A and B after it.
2. A's cores on the model as it now is: one probe fine-tune from θ_A on A's rows (``probe_steps``, the probe-only
   settings) read by every signal at once (Σ g², |Σ g|, |θ − θ_A|), and, with ``no_step``, Σ g² of ``probe_steps``
   batches at θ_A without any step (``probe_updates_weights=False``); each at every core fraction p. The control
   is a random subset of the same size (seeded). Each core is written as a DPI artifact with θ_A's fingerprint.
3. For each condition (nothing protected, each signal × p, each random p), from θ_A: SFT on B for ``max_steps``
   with ``DPIConfig(protect_cores_from=<that artifact>)`` — the product path — and the held-out NLL of A and B.

Forgetting of A = NLL_A after B − NLL_A after A; learning of B = NLL_B after A − NLL_B after B. The share of
forgetting a protection removes = 1 − forgetting / forgetting with nothing protected (same seed: same A model, same
B batches, so conditions differ only by what is frozen); its cost = NLL_B − NLL_B with nothing protected. Across
seeds: mean and sample standard deviation. Finished (pair, seed, condition) results are kept in
``sequential.json`` and skipped on a rerun.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from ..core.errors import DPIConfigError
from ..utils import check_unknown_keys

RESULTS_FILE = "sequential.json"
TABLE_FILE = "sequential.md"
PLOT_FILE = "sequential.png"
_KEYS = ("pairs", "signals", "core_fractions", "random_control", "no_step", "seeds", "nll_samples")


@dataclass
class SequentialSettings:
    """The ``sequential:`` section of a recipe.

    Attributes:
        pairs: ``[[A, B], ...]`` task names: train A, then B (default: the recipe's first two tasks).
        signals: the core signals to protect with (default ``["fisher", "gradsum", "update"]``).
        core_fractions: the core sizes p (default ``[0.01, 0.05]``).
        random_control: also protect a random subset of each size p (default True).
        no_step: also Σ g² at θ_A without an optimizer step (``probe_updates_weights=False``) (default True).
        seeds: training seeds (default ``[0, 1, 2]``).
        nll_samples: held-out rows scored per task (default None: all of each task's eval split).
    """

    pairs: list[list[str]] | None = None
    signals: list[str] = field(default_factory=lambda: ["fisher", "gradsum", "update"])
    core_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05])
    random_control: bool = True
    no_step: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    nll_samples: int | None = None

    @classmethod
    def from_dict(cls, data: dict | None, task_names: list[str]) -> "SequentialSettings":
        data = dict(data or {})
        check_unknown_keys(data, _KEYS, "recipe: sequential")
        s = cls(**data)
        from ..core.selection import validate_core_fraction
        from ..core.signals import validate_signal

        s.pairs = s.pairs or [task_names[:2]]
        for pair in s.pairs:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[0] != pair[1]):
                raise DPIConfigError(f"sequential.pairs: {pair!r} is not a pair of two different task names [A, B].")
            unknown = [t for t in pair if t not in task_names]
            if unknown:
                raise DPIConfigError(f"sequential.pairs names {unknown}, which are not tasks of the recipe "
                                     f"({task_names}).")
        s.signals = [validate_signal(x) for x in s.signals]
        s.core_fractions = [validate_core_fraction(p) for p in s.core_fractions]
        if not s.seeds:
            raise DPIConfigError("sequential.seeds is empty; give at least one seed (three for a spread).")
        return s

    def conditions(self) -> list[tuple[str, str | None, float | None]]:
        """``(name, signal, p)`` of every condition: ``none``, each signal × p, ``fisher-nostep`` × p, ``random`` × p."""
        out: list[tuple[str, str | None, float | None]] = [("none", None, None)]
        for p in self.core_fractions:
            out += [(f"{sig} {_pct(p)}", sig, p) for sig in self.signals]
            if self.no_step:
                out.append((f"fisher-nostep {_pct(p)}", "fisher-nostep", p))
            if self.random_control:
                out.append((f"random {_pct(p)}", "random", p))
        return out


def load_sequential_recipe(path, overrides=(), section_overrides: dict | None = None):
    """Read a sequential recipe: an ordinary recipe plus the ``sequential:`` section.

    Args:
        path: the YAML file.
        overrides: recipe overrides, as :func:`~dpi_hf.run.reading.read_recipe` takes them (default none).
        section_overrides: keys of the ``sequential:`` section to replace (default none).

    Returns:
        ``(recipe, settings, raw)``: the validated :class:`~dpi_hf.run.recipe.Recipe`, the
        :class:`SequentialSettings`, and the resolved mapping (its keys say which training fields the recipe sets).
    """
    from ..run.environment import prepare_raw
    from ..run.reading import read_recipe
    from ..run.recipe import Recipe

    raw = read_recipe(path, overrides)
    section = {**(raw.pop("sequential", None) or {}), **(section_overrides or {})}
    prepare_raw(raw)  # before huggingface_hub is imported: offline when the recipe wants it
    recipe = Recipe.from_dict(raw, source=str(path))
    if len(recipe.tasks) < 2:
        raise DPIConfigError(f"a sequential recipe needs at least two tasks; {path} has {len(recipe.tasks)}.")
    return recipe, SequentialSettings.from_dict(section, [t.name for t in recipe.tasks]), raw


def _pct(p: float) -> str:
    return f"{100 * p:g}%"


def _sft_args(training: dict, output_dir: Path, seed: int, **extra):
    """DPIConfig for one plain SFT phase: the recipe's SFT fields (DPI fields left at their defaults, so a single
    dataset is plain SFT) plus ``extra`` (e.g. the protection)."""
    from ..trainer.config import DPIConfig
    from ..trainer.run_state import DPI_FIELDS

    sft = {k: v for k, v in training.items() if k not in DPI_FIELDS and k != "output_dir"}
    # no checkpoints: every phase is short and a rerun skips finished conditions instead
    return DPIConfig(**{**sft, "save_strategy": "no", "report_to": [], **extra, "output_dir": str(output_dir),
                        "seed": seed})


def _probe_importance(model, tokenizer, rows, training: dict, args, output_dir: Path, seed: int,
                      no_step: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Every signal's importance of ``rows`` at the model's current weights, from one probe fine-tune read by all
    signals at once (and, with ``no_step``, one pass without steps); the weights are restored bit-exactly after."""
    from trl import SFTTrainer

    from ..trainer.callbacks import CoreProbeCallback, snapshot_parameters
    from ..core.sharding import restore_parameters

    a = args  # the probe-only settings of the recipe's DPIConfig, as a DPI run's probes use them
    probe = dict(max_steps=a.probe_steps, learning_rate=a.probe_learning_rate or a.learning_rate,
                 weight_decay=a.probe_weight_decay, lr_scheduler_type=a.probe_lr_scheduler_type,
                 warmup_steps=a.probe_warmup_steps,
                 per_device_train_batch_size=a.probe_batch_size or a.per_device_train_batch_size)
    probe_args = _sft_args({**training, **probe}, output_dir, seed)
    theta = snapshot_parameters(model)
    out = {}
    if no_step:
        cb = CoreProbeCallback(signal="fisher", keep_importance=True, update_weights=False, task_name="no-step")
        SFTTrainer(model, args=probe_args, train_dataset=rows, processing_class=tokenizer, callbacks=[cb]).train()
        out["fisher-nostep"] = cb.importance
    cbs = {sig: CoreProbeCallback(signal=sig, keep_importance=True, task_name=sig, reference=theta)
           for sig in ("fisher", "gradsum", "update")}
    SFTTrainer(model, args=probe_args, train_dataset=rows, processing_class=tokenizer,
               callbacks=list(cbs.values())).train()
    out.update({sig: cb.importance for sig, cb in cbs.items()})
    restore_parameters(model, theta)
    return out


class _StepTimer(TrainerCallback):
    """Median seconds per optimizer step after the first (which pays one-off set-up: the freezer's index, lazy
    optimizer state)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def seconds_per_step(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def random_core(model, core_fraction: float, seed: int):
    """A random subset of ``model``'s trainable elements of exactly the size of a top-p core (seeded)."""
    from ..core import select_core

    g = torch.Generator().manual_seed(seed)
    importance = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
    return select_core(importance, core_fraction)


def _write_core(directory: Path, task: str, core, fingerprint: dict, settings: dict) -> Path:
    from ..artifacts import save_dpi_artifacts
    from ..core.planning import plan_from_groups

    plan = plan_from_groups({task: core}, [[task]], tasks=[task], freeze=False, jaccard_threshold=0.0,
                            stage_order="given")
    save_dpi_artifacts(directory, {task: core}, plan, fingerprint=fingerprint, **settings)
    return directory


def run_sequential(recipe, settings: SequentialSettings, output_dir, training: dict,
                   log: Callable[[str], None] = print) -> dict:
    """Run the scenario of ``settings`` on ``recipe``'s model, tasks and training fields; return the results.

    Args:
        recipe: a validated :class:`~dpi_hf.run.recipe.Recipe` (its training fields: ``max_steps`` of each of the
            two trainings, the batch, learning rate, ``probe_steps`` and the probe settings).
        settings: the ``sequential:`` section.
        training: the training fields the recipe sets (SFT fields are used for both trainings; DPI fields other
            than the probe settings are ignored).
        output_dir: where ``sequential.json``, ``sequential.md``, ``sequential.png`` and the cores go.
        log: progress lines (default print).
    """
    from ..trainer.callbacks import snapshot_parameters
    from ..core import model_fingerprint, select_core
    from ..core.sharding import restore_parameters
    from ..data import load_tasks
    from ..evaluation.nll import heldout_nll
    from ..run.model import load_model_and_tokenizer
    from ..trainer import DPITrainer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    done = json.loads(results_path.read_text())["runs"] if results_path.is_file() else []
    key = {(r["pair"], r["seed"], r["condition"]) for r in done}
    tasks = load_tasks(recipe.tasks)
    args = recipe.args

    def evalset(t):
        ds = tasks[t]["eval"]
        return ds.select(range(min(settings.nll_samples, len(ds)))) if settings.nll_samples else ds

    def nll(model, tok, t):
        model.eval()
        return heldout_nll(model, tok, evalset(t), batch_size=8)["nll"]

    conditions = settings.conditions()
    for a_task, b_task in settings.pairs:
        pair = f"{a_task}->{b_task}"
        for seed in settings.seeds:
            todo = [c for c in conditions if (pair, seed, c[0]) not in key]
            if not todo:
                continue
            run_dir = out / f"{a_task}-then-{b_task}" / f"seed-{seed}"
            model, tok = load_model_and_tokenizer(recipe.model)
            theta_a_file = run_dir / "model-a.safetensors"
            if theta_a_file.is_file():
                from safetensors.torch import load_file

                restore_parameters(model, load_file(str(theta_a_file)))
                log(f"[sequential] {pair} seed {seed}: reusing the A model {theta_a_file}")
            else:
                log(f"[sequential] {pair} seed {seed}: training {a_task} ({args.max_steps} steps)")
                DPITrainer(model, args=_sft_args(training, run_dir / "a", seed), train_dataset=tasks[a_task]["train"],
                           processing_class=tok).train()
                from ..core.io import atomic_save_file

                atomic_save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, theta_a_file)
            theta_a = snapshot_parameters(model)
            nll_a0, nll_b0 = nll(model, tok, a_task), nll(model, tok, b_task)
            log(f"[sequential] after {a_task}: NLL {a_task} {nll_a0:.4f}, {b_task} {nll_b0:.4f}")
            fingerprint = model_fingerprint(model)
            log(f"[sequential] probing {a_task}'s cores on the trained model ({args.probe_steps} steps)")
            t0 = time.perf_counter()
            importance = _probe_importance(model, tok, tasks[a_task]["train"], training, args, run_dir / "probe",
                                           seed, settings.no_step)
            probe_seconds = time.perf_counter() - t0
            # every core now, then drop the importance (one model-sized float32 tensor set per signal)
            cores = {(signal, p): select_core(importance[signal], p) for _, signal, p in todo
                     if signal not in (None, "random")}
            del importance
            for name, signal, p in todo:
                restore_parameters(model, theta_a)
                extra = {}
                elements = 0
                if signal is not None:
                    core = random_core(model, p, seed=1000 * seed + round(1e4 * p)) if signal == "random" \
                        else cores[(signal, p)]
                    elements = core.count()
                    cdir = _write_core(run_dir / "cores" / name.replace(" ", "-").replace("%", "pct"), a_task, core,
                                       fingerprint, {"core_fraction": p, "core_signal": signal})
                    extra = {"protect_cores_from": str(cdir)}
                log(f"[sequential] {pair} seed {seed}: {b_task} with {name} protected")
                b_args = _sft_args(training, run_dir / "b" / name.replace(" ", "-").replace("%", "pct"), seed,
                                   overwrite_output_dir=True, **extra)
                timer = _StepTimer()
                trainer = DPITrainer(model, args=b_args, train_dataset=tasks[b_task]["train"], processing_class=tok,
                                     callbacks=[timer])
                result = trainer.train()
                nll_a, nll_b = nll(model, tok, a_task), nll(model, tok, b_task)
                row = {"pair": pair, "seed": seed, "condition": name, "signal": signal, "core_fraction": p,
                       "elements": elements, "nll_a_after_a": nll_a0, "nll_b_after_a": nll_b0, "nll_a": nll_a,
                       "nll_b": nll_b, "forgetting": nll_a - nll_a0, "learning": nll_b0 - nll_b,
                       "steps": result.global_step, "seconds_per_step": timer.seconds_per_step(),
                       "probe_seconds": probe_seconds}
                done.append(row)
                key.add((pair, seed, name))
                log(f"[sequential]   NLL {a_task} {nll_a:.4f} (forgetting {nll_a - nll_a0:+.4f}), "
                    f"{b_task} {nll_b:.4f}")
                _write_results(out, done, settings)
            del model, theta_a, cores
    return _write_results(out, done, settings)


def summarize(runs: list[dict]) -> dict:
    """Per pair and condition, over seeds (mean, sample sd, the values and their number ``n``): forgetting of A,
    learning of B, NLLs, seconds per step, and against the same seed's unprotected run the share of forgetting
    removed (1 − F / F_none; a seed whose unprotected forgetting is ≤ 0 has no share and is left out, so its ``n`` is
    smaller) and the cost on B (NLL_B − NLL_B of none). Also ``pooled_share_removed`` = 1 − mean F / mean F_none
    over the seeds that have both (robust to a seed with tiny F_none) and ``vs_random``: the pooled share divided by
    the random control's pooled share at the same p."""
    by_seed_none = {(r["pair"], r["seed"]): r for r in runs if r["condition"] == "none"}
    summary: dict[str, dict[str, Any]] = {}
    keys = ("forgetting", "share_removed", "learning", "cost", "nll_a", "nll_b", "seconds_per_step")
    for r in runs:
        base = by_seed_none.get((r["pair"], r["seed"]))
        entry = summary.setdefault(r["pair"], {}).setdefault(r["condition"], {
            "signal": r["signal"], "core_fraction": r["core_fraction"], "elements": r.get("elements", 0),
            "seeds": [], "_paired": [], **{k: [] for k in keys}})
        entry["seeds"].append(r["seed"])
        for k in ("forgetting", "learning", "nll_a", "nll_b", "seconds_per_step"):
            entry[k].append(r[k])
        if base is not None:
            entry["cost"].append(r["nll_b"] - base["nll_b"])
            entry["_paired"].append((r["forgetting"], base["forgetting"]))
            if base["forgetting"] > 0:
                entry["share_removed"].append(1.0 - r["forgetting"] / base["forgetting"])
    for pair in summary.values():
        for entry in pair.values():
            paired = entry.pop("_paired")
            f_none = statistics.fmean(b for _, b in paired) if paired else None
            entry["pooled_share_removed"] = (1.0 - statistics.fmean(f for f, _ in paired) / f_none
                                             if f_none and f_none > 0 else None)
            for k in keys:
                xs = [x for x in entry[k] if x is not None]
                entry[k] = {"mean": statistics.fmean(xs) if xs else None,
                            "std": statistics.stdev(xs) if len(xs) > 1 else None, "values": xs, "n": len(xs)}
        for name, entry in pair.items():
            control = next((e for e in pair.values() if e["signal"] == "random"
                            and e["core_fraction"] == entry["core_fraction"]), None)
            ours, theirs = entry["pooled_share_removed"], control["pooled_share_removed"] if control else None
            entry["vs_random"] = ours / theirs if ours is not None and theirs and theirs > 0 \
                and entry["signal"] not in (None, "random") else None
    return summary


def _fmt(stat, signed=False, pct=False):
    if stat["mean"] is None:
        return "—"
    m, s = stat["mean"], stat["std"]
    if pct:
        return f"{100 * m:.0f}%" + (f" ± {100 * s:.0f}%" if s is not None else "")
    f = "{:+.4f}" if signed else "{:.4f}"
    return f.format(m) + (f" ± {s:.4f}" if s is not None else "")


def format_table(summary: dict) -> str:
    """Markdown: one table per pair, one row per condition (mean ± sd over seeds)."""
    lines = []
    for pair, conds in summary.items():
        a, b = pair.split("->")
        none = conds.get("none")
        n = none["forgetting"]["n"] if none else 0
        lines += [f"### {a} → {b} ({n} seeds; mean ± sd over seeds)", "",
                  f"| protected during {b} | elements | forgetting of {a} (NLL) | share of forgetting removed | "
                  f"pooled share | × random | {b} NLL | cost on {b} | s/step vs none |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base_speed = none["seconds_per_step"]["mean"] if none else None
        for name, e in conds.items():
            speed = e["seconds_per_step"]["mean"]
            ratio = f"{speed / base_speed:.3f}" if base_speed and speed else "—"
            share = "—" if name == "none" else _fmt(e["share_removed"], pct=True) + (
                f" (n={e['share_removed']['n']})" if e["share_removed"]["n"] != e["forgetting"]["n"] else "")
            pooled = "—" if name == "none" or e["pooled_share_removed"] is None else \
                f"{100 * e['pooled_share_removed']:.0f}%"
            vs = f"{e['vs_random']:.1f}×" if e["vs_random"] is not None else "—"
            lines.append(f"| {name} | {e['elements']:,} | {_fmt(e['forgetting'], True)} | {share} | {pooled} | {vs} | "
                         f"{_fmt(e['nll_b'])} | {_fmt(e['cost'], True) if name != 'none' else '—'} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def _write_results(out: Path, runs: list[dict], settings: SequentialSettings) -> dict:
    from ..core.io import atomic_write_text

    summary = summarize(runs)
    results = {"settings": settings.__dict__, "runs": runs, "summary": summary}
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    atomic_write_text(out / TABLE_FILE, format_table(summary))
    plot_sequential(out / PLOT_FILE, summary)
    results["files"] = {"results": RESULTS_FILE, "table": TABLE_FILE, "plot": PLOT_FILE}
    return results


def plot_sequential(path: Path, summary: dict) -> None:
    """One panel per pair: the share of forgetting each protection removes (bars: mean, whiskers: sd, dots: seeds),
    random controls in grey."""
    from ..inspection import pyplot

    plt = pyplot()
    pairs = list(summary)
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6.5 * max(len(pairs), 1), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        conds = [(n, e) for n, e in summary[pair].items() if n != "none" and e["share_removed"]["mean"] is not None]
        xs = range(len(conds))
        means = [100 * e["share_removed"]["mean"] for _, e in conds]
        stds = [100 * (e["share_removed"]["std"] or 0.0) for _, e in conds]
        colors = ["0.6" if e["signal"] == "random" else "C0" if e["signal"] in ("fisher", "fisher-nostep") else "C1"
                  for _, e in conds]
        ax.bar(xs, means, yerr=stds, color=colors, capsize=3)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="C0", label="Σg² (fisher, fisher-nostep)"),
                           Patch(color="C1", label="|Σg| (gradsum), |θ−θ_A| (update)"),
                           Patch(color="0.6", label="random subset, same size")], fontsize=7, loc="upper left")
        for x, (_, e) in zip(xs, conds):
            ax.scatter([x] * len(e["share_removed"]["values"]), [100 * v for v in e["share_removed"]["values"]],
                       color="k", s=8, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [n for n, _ in conds], rotation=40, ha="right")
        ax.set_ylabel("share of forgetting removed (%)")
        a, b = pair.split("->")
        ax.set_title(f"{a} then {b}: protecting {a}'s core while training {b}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
