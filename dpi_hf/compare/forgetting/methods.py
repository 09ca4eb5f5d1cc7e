"""How each method of the forgetting benchmark trains B from θ_A, or builds its model from trained ones.

Every trained method runs the product path: one ``DPITrainer`` on B's rows from a copy of the A model, with the
same steps, batch, seed and learning rate (LoRA: its grid's rate), differing only in what the method adds:

- ``none``: nothing; ``replay``: a share of A's training rows mixed into B's (same steps, so fewer B rows seen);
- ``freeze`` (A's core at p), ``random``, ``random_per_tensor``, ``largest_theta``, ``other_core`` (controls of the
  size of A's core at the reference p): ``protect_cores_from`` an artifact holding that mask (frozen bit-exactly);
- ``ewc``, ``ewc_core`` (``protect_ewc_scope="core"``), ``freeze_ewc``, ``l2sp``: ``protect_method`` with
  ``protect_lambda`` and ``protect_ewc_form``, the weights from A's stored importance;
- ``lora``: ``peft_config`` (r, ``lora_alpha = 2r``, every linear layer), merged into full weights afterwards.

The post-hoc methods train nothing: ``wise_ft`` is (1 − α) θ_A + α θ_B of the unprotected B model (``base=none``)
or of the one trained with A's core frozen at the reference p (``base=freeze``); ``core_interp`` takes α_core on
A's core elements (reference p) and α_rest elsewhere, from the unprotected B model; both through
:func:`dpi_hf.merge_models`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...core.copying import independent_copy
from .settings import Setting

__all__ = ["sft_args", "protection", "train_rows", "train_b", "interpolate", "base_of"]

_EWC_METHODS = {"ewc": "ewc", "ewc_core": "ewc", "freeze_ewc": "freeze_ewc", "l2sp": "l2sp"}
_CONTROLS = ("random", "random_per_tensor", "largest_theta", "other_core")


def sft_args(training: dict, output_dir: Path, seed: int, **extra):
    """DPIConfig of one plain SFT training: the recipe's SFT fields (its DPI fields left at their defaults, so one
    dataset is plain SFT), no checkpoints (a rerun skips finished runs instead), plus ``extra``."""
    from ...trainer.config import DPIConfig
    from ...trainer.run_state import DPI_FIELDS

    sft = {k: v for k, v in training.items() if k not in DPI_FIELDS and k != "output_dir"}
    return DPIConfig(**{**sft, "save_strategy": "no", "report_to": [], "overwrite_output_dir": True, **extra,
                        "output_dir": str(output_dir), "seed": seed})


def protection(setting: Setting, cores, reference_fraction: float, other_task: str, other_rows) -> dict:
    """The DPIConfig fields that protect A during B for ``setting`` (empty for none, replay and LoRA)."""
    m, v = setting.method, setting.values
    ref = reference_fraction
    if m == "freeze":
        p = v["p"]
        return {"protect_cores_from": cores.artifact(f"core-p{p:g}", cores.core(p), cores.task, p,
                                                     with_importance=p == ref)}
    if m in _CONTROLS:
        mask = cores.control(m, other_task, other_rows)
        label = other_task if m == "other_core" else cores.task
        return {"protect_cores_from": cores.artifact(f"{m}-p{ref:g}", mask, label, ref)}
    if m in _EWC_METHODS:
        source = cores.artifact(f"core-p{ref:g}", cores.core(ref), cores.task, ref, with_importance=True)
        fields = {"protect_cores_from": source, "protect_method": _EWC_METHODS[m],
                  "protect_lambda": float(v["lambda"]), "protect_ewc_form": v["form"]}
        if m == "ewc_core":
            fields["protect_ewc_scope"] = "core"
        return fields
    return {}


def train_rows(setting: Setting, a_rows, b_rows, b_task: str, seed: int):
    """B's training rows; with ``replay``, plus ``round(f · n_B / (1 − f))`` of A's rows (drawn with ``seed``, with
    replacement only when A has fewer rows), so that A's rows are a share f of the mixture. Replayed rows are
    labelled with B's task name: the mixture is one dataset, trained as plain SFT, not as DPI tasks."""
    if setting.method != "replay":
        return b_rows
    from datasets import concatenate_datasets

    f = setting.values["fraction"]
    n = round(f * len(b_rows) / (1 - f))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(a_rows), size=n, replace=n > len(a_rows)).tolist()
    replayed = a_rows.select(picked).map(lambda _: {"task": b_task})
    return concatenate_datasets([b_rows, replayed])


def train_b(model_a, tokenizer, setting: Setting, rows, training: dict, output_dir: Path, seed: int, steps: int,
            learning_rate: float, protect: dict) -> tuple:
    """Train a copy of ``model_a`` on ``rows`` for ``steps`` steps; returns ``(model, info)`` with ``info`` the
    steps, examples and seconds trained, the elements frozen and the trainable parameters."""
    from ...trainer import DPITrainer

    model = independent_copy(model_a)
    kwargs = {}
    if setting.method == "lora":
        from peft import LoraConfig

        r = int(setting.values["r"])
        kwargs["peft_config"] = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM")
        learning_rate = float(setting.values["learning_rate"])
    args = sft_args(training, output_dir, seed, max_steps=steps, learning_rate=learning_rate, **protect)
    t0 = time.perf_counter()
    trainer = DPITrainer(model, args=args, train_dataset=rows, processing_class=tokenizer, **kwargs)
    result = trainer.train()
    seconds = time.perf_counter() - t0
    trained = trainer.model
    # "ewc", "ewc_core" and "l2sp" read the cores artifact (EWC's weights, its core scope) but freeze nothing
    freezes = protect.get("protect_method", "freeze") in ("freeze", "freeze_ewc")
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    if setting.method == "lora":
        trained = trained.merge_and_unload()
    info = {"steps": result.global_step, "seconds": seconds, "learning_rate": learning_rate,
            "examples": result.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size, "trainable_parameters": trainable,
            "frozen_elements": trainer.protected.count() if freezes and trainer.protected is not None else 0}
    del trainer
    return trained, info


def base_of(setting: Setting, reference_fraction: float) -> Setting:
    """The trained B model a post-hoc setting interpolates: "none", or A's core frozen at the reference p."""
    if setting.method == "wise_ft" and setting.values["base"] == "freeze":
        return Setting("freeze", (("p", reference_fraction),))
    return Setting("none")


def interpolate(model_a, model_b, setting: Setting, cores, reference_fraction: float):
    """The post-hoc model of ``setting`` from θ_A and θ_B (inputs unchanged)."""
    from ...merging import merge_models

    v = setting.values
    if setting.method == "wise_ft":
        return merge_models(model_a, model_b, float(v["alpha"]))
    return merge_models(model_a, model_b, float(v["alpha_rest"]), cores=cores.core(reference_fraction),
                        alpha_core=float(v["alpha_core"]))
