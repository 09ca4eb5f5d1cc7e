"""Protect what a model already knows: probe the cores of its existing skills, then keep them frozen while it learns.

Two steps, each usable on its own:

1. :func:`probe_cores` — the cores of one or more named datasets on the model *as it is now* (its own fine-tune, a
   Hub checkpoint), written to ``args.output_dir/dpi/`` like any DPI run's cores (with the split-half reliability
   report by default); the model's weights are the same before and after.
2. ``DPIConfig(protect_cores_from=that_dir)`` — any later DPITrainer run (one dataset: SFTTrainer plus the
   protection; several tasks: DPI's stages) keeps those cores frozen, bit-exact, for its whole training.

Example::

    args = DPIConfig("out/gsm8k-cores", probe_steps=16, probe_updates_weights=False)   # Σg² at the current weights
    probe_cores(model, {"gsm8k": gsm8k_rows}, args, processing_class=tokenizer)

    args = DPIConfig("out/alpaca", max_steps=200, protect_cores_from="out/gsm8k-cores")
    DPITrainer(model, args=args, train_dataset=alpaca_rows, processing_class=tokenizer).train()
"""

from __future__ import annotations

from datasets import Dataset

from .config import DPIConfig
from ..core.errors import DPIConfigError
from ..core.masks import CoreMask
from .multitask import split_tasks
from .trainer import DPITrainer


class CoreProbingTrainer(DPITrainer):
    """A DPITrainer for :meth:`~dpi_hf.DPITrainer.probe` that also accepts a single task (a training run of one task
    is plain SFT, but probing one task is how a model's existing skill gets a core). Use ``probe()``, not
    ``train()``; :func:`probe_cores` is the one-call form."""

    _single_task_probes = True

    def train(self, *args, **kwargs):
        raise DPIConfigError("CoreProbingTrainer only probes: call probe(), or train with DPITrainer.")


def probe_cores(model, datasets, args: DPIConfig | None = None, processing_class=None, *, importance_from=None,
                **trainer_kwargs) -> dict[str, CoreMask]:
    """The cores of ``datasets`` on ``model`` as it is now, written to ``args.output_dir/dpi/``; no training.

    Each task is probed as in a DPI run (``core_signal``, ``core_fraction``, ``probe_steps``, the probe-only
    optimiser settings, split-half reliability by default), from the model's current weights, which are restored
    bit-exactly afterwards (with ``probe_updates_weights=False`` and a gradient signal nothing moves at all: the
    gradients of ``probe_steps`` batches are read at the current weights and no step is taken).

    Args:
        model: the model (or a Hub id / path) whose skills are probed.
        datasets (`dict[str, Dataset]` or `Dataset`): task name → its rows (one task is enough), or one dataset
            whose ``args.task_column`` names each row's task.
        args (`DPIConfig`, optional): the probe settings and ``output_dir``; default ``DPIConfig("dpi-cores")``.
        processing_class: the tokenizer, as for SFTTrainer.
        importance_from (`str`, optional): a directory whose ``dpi/importance.safetensors`` (written by an earlier
            probe with ``save_importance=True``) holds these tasks' importance: the cores are selected from it at
            ``args.core_fraction`` and ``args.core_scope`` without probing again (``datasets`` then only names the
            tasks — its rows are not read — and may be None for all stored tasks). The importance must have been
            measured on this model's weights. bfloat16 storage can tie elements at the threshold, so the cores equal
            a fresh probe's except where such ties are broken by position. No split-half reliability is measured.
        **trainer_kwargs: passed to the trainer (``data_collator``, ``formatting_func``, ``peft_config`` is not
            supported).

    Returns:
        task → :class:`~dpi_hf.core.CoreMask`. ``output_dir/dpi/`` holds ``cores.safetensors`` (with the model's
        fingerprint), ``plan.json`` (with the reliability report) and a model card section; pass ``output_dir`` as
        ``protect_cores_from`` to protect these cores in a later run, or as ``masks_from`` to plan a DPI run on them.

    Raises:
        DPIConfigError: no dataset, a dataset without task names, or settings that do not probe (``masks_from``,
            a baseline staging).
    """
    if args is None:
        args = DPIConfig("dpi-cores")
    elif not isinstance(args, DPIConfig):
        raise DPIConfigError(f"probe_cores needs a DPIConfig (got {type(args).__name__}); e.g. DPIConfig(output_dir).")
    if importance_from is not None:
        from .importance import cores_from_importance

        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        if isinstance(datasets, Dataset):
            datasets = split_tasks(datasets, args.task_column)
        return cores_from_importance(model, args, importance_from, list(datasets) if datasets else None)
    if isinstance(datasets, Dataset):
        named = split_tasks(datasets, args.task_column)
        if named is None:
            raise DPIConfigError(
                f"probe_cores got one dataset without a {args.task_column!r} column, so its task has no name; pass "
                "a dict, e.g. probe_cores(model, {'gsm8k': rows}, args)."
            )
        datasets = named
    if not isinstance(datasets, dict) or not datasets:
        raise DPIConfigError("probe_cores needs at least one named dataset, e.g. probe_cores(model, {'gsm8k': rows}, args).")
    if args.masks_from is not None:
        raise DPIConfigError(
            f"probe_cores computes cores; masks_from={args.masks_from!r} would reuse saved ones instead. Drop masks_from."
        )
    if args.staging != "dpi":
        raise DPIConfigError(f"probe_cores probes with staging='dpi'; got staging={args.staging!r}. Drop staging.")
    if args.protects:
        raise DPIConfigError(
            "probe_cores measures the model as it is; protect_cores_from only applies to training. Drop it here."
        )
    trainer = CoreProbingTrainer(model, args=args, train_dataset=dict(datasets), processing_class=processing_class,
                                 **trainer_kwargs)
    trainer.probe()
    return trainer.cores
