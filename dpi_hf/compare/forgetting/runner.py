"""The forgetting benchmark's loop: for each pair, seed and B length, the A model once, then every selected setting
of every method from it; each finished run is appended to ``forgetting.json`` at once, and skipped on a rerun.

Per (pair, seed): the tasks are loaded with their seeds offset by the harness seed (other rows, not only another
order); the base model and the majority-answer baselines are measured; A is trained (``a_steps``) and kept as
``model-a.safetensors``; A and B are measured after A. Then per B length and setting: the method's model (a B
training from a copy of θ_A, or an interpolation of trained ones) and its measurements: accuracy and NLL on each
task's ``eval`` rows (reported) and accuracy on its ``validation`` rows (only to choose settings).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import time
from pathlib import Path

from ...core.copying import independent_copy
from ...core.errors import DPIConfigError
from . import methods as M
from .cores import Cores
from .evaluation import check_verifiable, majority_baseline, score_rows
from .settings import POST_HOC, ForgettingSettings, Pair, Setting

__all__ = ["run_forgetting", "ResultsStore", "RESULTS_FILE"]

RESULTS_FILE = "forgetting.json"


class ResultsStore:
    """``forgetting.json``: the settings, the command, one record per A model (``a_models``: "pair|seed" → the
    measurements before and after A, the baselines, the held-out rows dropped) and one per finished run
    (``runs``). Written atomically after every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("a_models", {})
        self.data.setdefault("runs", [])
        self._done = {self._key(r["pair"], r["seed"], r["b_steps"], r["label"]) for r in self.data["runs"]}

    @staticmethod
    def _key(pair: str, seed: int, b_steps: int, label: str) -> tuple:
        return pair, int(seed), int(b_steps), label

    def done(self, pair: str, seed: int, b_steps: int, label: str) -> bool:
        return self._key(pair, seed, b_steps, label) in self._done

    def add(self, row: dict) -> None:
        self.data["runs"].append(row)
        self._done.add(self._key(row["pair"], row["seed"], row["b_steps"], row["label"]))
        self.save()

    def save(self) -> None:
        from ...core.io import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label)


class SeedRun:
    """Everything one (pair, seed) shares: its data, θ_A, the measurements after A, A's cores."""

    def __init__(self, recipe, settings: ForgettingSettings, pair: Pair, seed: int, out: Path, training: dict,
                 store: ResultsStore, log):
        self.recipe, self.settings, self.pair, self.seed = recipe, settings, pair, seed
        self.training, self.store, self.log = training, store, log
        self.key = f"{pair.name}|{seed}"
        self.dir = Path(out) / f"{pair.a}-then-{pair.b}" / f"seed-{seed}"
        self.control = pair.control_task or settings.control_task or pair.b
        self.a_steps = settings.a_steps or recipe.args.max_steps
        self.a_lr = pair.a_learning_rate or settings.a_learning_rate or recipe.args.learning_rate
        self.b_lr = pair.b_learning_rate or settings.b_learning_rate or recipe.args.learning_rate
        self.bases = {M.base_of(s, settings.reference_fraction).label for s in settings.all_settings()
                      if s.method in POST_HOC}

    # ----------------------------------------------------------------------------------------------- set-up
    def _load_data(self) -> None:
        from ...data import load_task

        specs = {t.name: t for t in self.recipe.tasks}
        names = [self.pair.a, self.pair.b]
        if "other_core" in self.settings.methods and self.control not in names:
            names.append(self.control)
        self.data, self.reports = {}, {}
        for name in names:
            spec = specs[name]
            shifted = dataclasses.replace(spec, seed=spec.seed + self.seed, eval_seed=None if spec.eval_seed is None
                                          else spec.eval_seed + self.seed)
            self.reports[name] = {}
            self.data[name] = load_task(shifted, self.reports[name])
        for name in (self.pair.a, self.pair.b):
            for split, n in (("eval", "eval_samples"), ("validation", "validation_samples")):
                if split not in self.data[name]:
                    raise DPIConfigError(f"task {name!r} has no {split} split; set its {n} (the benchmark reports "
                                         "on eval rows and chooses settings on validation rows).")
            check_verifiable(name, self.data[name]["eval"])

    def _rows(self, task: str, split: str):
        rows = self.data[task][split]
        cap = self.settings.eval_rows if split == "eval" else self.settings.validation_rows
        return rows.select(range(min(cap, len(rows)))) if cap else rows

    def measure(self, model, nll: bool = True) -> dict:
        """Accuracy (and NLL) of both tasks on their eval rows, and accuracy on their validation rows."""
        s = self.settings
        out = {"validation": {}}
        for role, task in (("a", self.pair.a), ("b", self.pair.b)):
            out[role] = score_rows(model, self.tokenizer, self._rows(task, "eval"), max_new_tokens=s.max_new_tokens,
                                   batch_size=s.eval_batch_size, nll=nll)
            out["validation"][role] = score_rows(model, self.tokenizer, self._rows(task, "validation"),
                                                 max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch_size,
                                                 nll=False)["accuracy"]
        return out

    def prepare(self) -> None:
        """Data, θ_A (trained once, then reused from disk) and the after-A record (measured once)."""
        from safetensors.torch import load_file

        from ...core.io import atomic_save_file
        from ...core.sharding import restore_parameters
        from ...run.model import load_model_and_tokenizer
        from ...trainer import DPITrainer

        self._load_data()
        model, self.tokenizer = load_model_and_tokenizer(self.recipe.model)
        record = self.store.data["a_models"].get(self.key)
        fresh = record is None
        if fresh:
            record = {"pair": self.pair.name, "seed": self.seed, "a_steps": self.a_steps, "a_learning_rate": self.a_lr,
                      "data": self.reports, "majority": {}, "base": {}}
            for role, task in (("a", self.pair.a), ("b", self.pair.b)):
                record["majority"][role] = majority_baseline(self.data[task]["train"], self._rows(task, "eval"))
            self.log(f"[sequential] {self.pair.name} seed {self.seed}: measuring the base model")
            base = self.measure(model)
            record["base"] = {r: {"accuracy": base[r]["accuracy"], "nll": base[r]["nll"]} for r in ("a", "b")}
        a_file = self.dir / "model-a.safetensors"
        if a_file.is_file():
            self.log(f"[sequential] {self.pair.name} seed {self.seed}: reusing the A model {a_file}")
        else:
            self.log(f"[sequential] {self.pair.name} seed {self.seed}: training {self.pair.a} ({self.a_steps} steps, "
                     f"lr {self.a_lr:g})")
            args = M.sft_args(self.training, self.dir / "a", self.seed, max_steps=self.a_steps,
                              learning_rate=self.a_lr)
            t0 = time.perf_counter()
            work = independent_copy(model)
            DPITrainer(work, args=args, train_dataset=self.data[self.pair.a]["train"],
                       processing_class=self.tokenizer).train()
            if fresh:
                record["seconds"] = time.perf_counter() - t0
            atomic_save_file({n: p.detach().contiguous() for n, p in work.named_parameters()}, a_file)
            del work
        # θ_A in a model no Trainer has touched: every run starts from a deep copy of it, and a Trainer leaves its
        # model's forward patched (TRL's fused LM head) with a closure over that very model, which a deep copy would
        # keep calling (the copy would compute with the original's weights)
        restore_parameters(model, load_file(str(a_file)))
        self.model_a = model
        if fresh:
            after = self.measure(model)
            record["after_a"] = {r: after[r] for r in ("a", "b")}
            record["validation_after_a"] = after["validation"]
            self.store.data["a_models"][self.key] = record
            self.store.save()
        self.after_a = record
        acc = {r: record["after_a"][r]["accuracy"] for r in ("a", "b")}
        self.log(f"[sequential] after {self.pair.a}: accuracy {self.pair.a} {acc['a']:.3f} (base "
                 f"{record['base']['a']['accuracy']:.3f}), {self.pair.b} {acc['b']:.3f}")
        a = self.recipe.args
        self.cores = Cores(model, self.tokenizer, self.pair.a, self.data[self.pair.a]["train"], self.training,
                           self.dir, self.seed, self.settings.reference_fraction,
                           {"scope": a.core_scope, "include": a.core_include, "exclude": a.core_exclude}, log=self.log)

    # ----------------------------------------------------------------------------------------------- runs
    def _model_file(self, setting: Setting, steps: int) -> Path:
        return self.dir / f"b{steps}" / "models" / f"{_safe(setting.label)}.safetensors"

    def _train(self, setting: Setting, steps: int):
        from ...core.io import atomic_save_file

        rows = M.train_rows(setting, self.data[self.pair.a]["train"], self.data[self.pair.b]["train"], self.pair.b,
                            self.seed)
        other = self.data.get(self.control, {}).get("train") if setting.method == "other_core" else None
        protect = M.protection(setting, self.cores, self.settings.reference_fraction, self.control, other)
        self.log(f"[sequential] {self.pair.name} seed {self.seed}: {self.pair.b} for {steps} steps, {setting.label}")
        model, info = M.train_b(self.model_a, self.tokenizer, setting, rows, self.training,
                                self.dir / f"b{steps}" / _safe(setting.label), self.seed, steps, self.b_lr, protect)
        if setting.label in self.bases:  # kept for the post-hoc methods (evaluation only, no second training)
            atomic_save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                             self._model_file(setting, steps))
        return model, info

    def _b_model(self, base: Setting, steps: int):
        """θ_B of ``base`` (from disk; trained, and recorded if new, when missing)."""
        from safetensors.torch import load_file

        from ...core.sharding import restore_parameters

        path = self._model_file(base, steps)
        if not path.is_file():
            self.log(f"[sequential] the B model of {base.label!r} is not on disk: training it")
            self.run(base, steps, force=True)
        model = independent_copy(self.model_a)
        restore_parameters(model, load_file(str(path)))
        return model

    def run(self, setting: Setting, steps: int, force: bool = False) -> None:
        """Build ``setting``'s model for B length ``steps``, measure it and record the run (unless recorded)."""
        if setting.method in POST_HOC:
            base = M.base_of(setting, self.settings.reference_fraction)
            model_b = self._b_model(base, steps)
            t0 = time.perf_counter()
            model = M.interpolate(self.model_a, model_b, setting, self.cores, self.settings.reference_fraction)
            info = {"steps": 0, "examples": 0, "seconds": time.perf_counter() - t0, "base": base.label}
            del model_b
        else:
            model, info = self._train(setting, steps)
        if force and self.store.done(self.pair.name, self.seed, steps, setting.label):
            del model
            return
        t0 = time.perf_counter()
        m = self.measure(model)
        del model
        gc.collect()
        self.store.add(self._row(setting, steps, m, info, time.perf_counter() - t0))
        a, b = m["a"]["accuracy"], m["b"]["accuracy"]
        self.log(f"[sequential]   accuracy {self.pair.a} {a:.3f} (forgetting "
                 f"{a - self.after_a['after_a']['a']['accuracy']:+.3f}), {self.pair.b} {b:.3f} (learning "
                 f"{b - self.after_a['after_a']['b']['accuracy']:+.3f})")

    def _row(self, setting: Setting, steps: int, m: dict, info: dict, eval_seconds: float) -> dict:
        after = self.after_a["after_a"]
        return {
            "pair": self.pair.name, "a": self.pair.a, "b": self.pair.b, "seed": self.seed, "a_steps": self.a_steps,
            "b_steps": steps, "method": setting.method, "setting": setting.values, "label": setting.label,
            "line": setting.line,
            "after_a": {r: {"accuracy": after[r]["accuracy"], "nll": after[r]["nll"]} for r in ("a", "b")},
            "after_b": {r: {"accuracy": m[r]["accuracy"], "nll": m[r]["nll"]} for r in ("a", "b")},
            "forgetting": m["a"]["accuracy"] - after["a"]["accuracy"],
            "learning": m["b"]["accuracy"] - after["b"]["accuracy"],
            "validation": m["validation"], "scores": {r: m[r]["scores"] for r in ("a", "b")},
            **info, "eval_seconds": eval_seconds,
        }

    def close(self) -> None:
        self.cores.release()
        del self.model_a, self.cores
        gc.collect()


def run_forgetting(recipe, settings: ForgettingSettings, output_dir, training: dict, command: str = "",
                   log=print) -> dict:
    """Run every selected setting of ``settings`` on ``recipe``'s model and tasks; return the results.

    Args:
        recipe: a validated :class:`~dpi_hf.run.recipe.Recipe` (the model, the tasks, ``max_steps``, the batch,
            ``learning_rate`` and the probe settings).
        settings: the ``sequential:`` section.
        output_dir: where ``forgetting.json``, ``results.md``, ``pareto.png``, the A models, cores and kept B
            models go.
        training: the training fields the recipe sets.
        command: the command line, written into the results.
        log: progress lines (default print).
    """
    from .report import write_outputs

    out = Path(output_dir)
    store = ResultsStore(out / RESULTS_FILE)
    store.data["settings"] = dataclasses.asdict(settings)
    store.data["command"] = command
    lengths = settings.b_lengths(recipe.args.max_steps)
    selected = settings.all_settings()
    for pair in settings.pairs:
        for seed in settings.seeds:
            todo = [(n, s) for n in lengths for s in selected if not store.done(pair.name, seed, n, s.label)]
            if not todo:
                continue
            run = SeedRun(recipe, settings, pair, seed, out, training, store, log)
            run.prepare()
            for steps, setting in todo:
                if not store.done(pair.name, seed, steps, setting.label):  # a base may have been run meanwhile
                    run.run(setting, steps)
            run.close()
            write_outputs(out, store, settings)
    return write_outputs(out, store, settings)
