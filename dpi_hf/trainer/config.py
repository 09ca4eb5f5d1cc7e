"""`DPIConfig`: `SFTConfig` plus the fields of Dynamic Parameter Isolation."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..core.affinity import DEFAULT_AFFINITY_THRESHOLD, validate_affinity_threshold
from ..core.errors import DPIConfigError
from ..core.planning import OVERLAPS, STAGE_ORDERS, default_jaccard_threshold, validate_jaccard_threshold
from ..core.selection import CORE_SCOPES, validate_core_fraction
from ..core.signals import DEFAULT_SIGNAL, SIGNAL_REGISTRY, get_signal, gradient_signals, validate_signal

STRATEGIES = ("dpi", "multitask", "random", "given")
RELIABILITY_MODES = ("none", "split_half")
FUSIONS = ("none", "cpi")
PROTECT_METHODS = ("freeze", "ewc", "freeze_ewc", "l2sp")
ANCHOR_METHODS = ("ewc", "freeze_ewc", "l2sp")  # the methods with a penalty (and λ)
IMPORTANCE_METHODS = ("ewc", "freeze_ewc")  # the methods that weigh the penalty by the stored importance
EWC_FORMS = ("loss", "decoupled")
EWC_SCOPES = ("all", "core")


@dataclass
class DPIConfig(SFTConfig):
    r"""
    Configuration for [`DPITrainer`]: every [`~trl.SFTConfig`] field plus the DPI fields below.

    With one dataset and no task column the DPI fields are ignored and DPITrainer is SFTTrainer. With several tasks,
    the training budget (`max_steps`, or `num_train_epochs` when `max_steps` ≤ 0) is the total of the staged
    training: with `max_steps`, each stage gets a share proportional to its number of training examples; with
    epochs, each stage runs `num_train_epochs` over its own data. Either way every strategy below sees the same
    number of training examples, which is what the paper's comparison needs.

    Parameters:
        staging (`str`, defaults to `"dpi"`):
            How tasks become stages. `"dpi"`: probe every task from θ0, group tasks whose cores overlap (overlap ≥
            `jaccard_threshold` on the matrix `overlap` names: by default the reliability-corrected overlap of the
            split-half probes), train the groups in stages and freeze earlier stages' cores.
            `"multitask"`: one stage on the uniform mixture of all tasks (baseline 1). `"random"`:
            `num_random_stages` stages with tasks assigned at random with `seed` (baseline 2). `"given"`: the stages
            in `stage_groups` (baseline 3, "heuristic"). The three baselines do not probe or freeze unless
            `freeze_cores=True` (then they probe too).
        core_fraction (`float`, defaults to `0.01`):
            p: the fraction of considered parameter elements that form a task's core region, in (0, 1]. The paper's
            main results use 1%; its ablation sweeps 0.1%–10%.
        jaccard_threshold (`float` or `None`, defaults to `None`):
            τ in [0, 1]: tasks whose cores overlap ≥ τ are trained together (connected components). `None`: by
            `overlap`, 0.7 on the reliability-corrected overlap (measured: a task against itself scores 0.97–1.00,
            six different reasoning-gym tasks 0.30–0.43, docs/results.md) and 0.1 on the raw Jaccard (the paper's
            main results; its text suggests 0.2–0.4).
        core_scope (`str`, defaults to `"global"`):
            `"global"`: the top p of all considered elements (as the paper); `"per_tensor"`: the top p of each tensor.
        core_include (`list[str]` or `None`, defaults to `None`):
            Parameter-name patterns (fnmatch globs or substrings) to consider; `None` considers every trainable
            parameter.
        core_exclude (`list[str]` or `None`, defaults to `None`):
            Patterns to leave out, e.g. `["*embed_tokens*", "*norm*"]`.
        probe_steps (`int`, defaults to `100`):
            Optimizer steps of each task's probe fine-tune (paper: "a limited number of epochs"). Ignored when
            `probe_epochs` is set.
        probe_epochs (`float` or `None`, defaults to `None`):
            Probe length in epochs over the task's data instead of steps.
        probe_learning_rate (`float` or `None`, defaults to `None`):
            Learning rate of the probes; `None` uses `learning_rate`.
        stage_order (`str`, defaults to `"given"`):
            Order of the DPI stages: `"given"` (first appearance of the tasks), `"largest_first"` (the group with
            the most training examples first) or `"random"` (seeded with `seed`).
        stage_groups (`list[list[str]]` or `None`, defaults to `None`):
            The stages for `staging="given"`, as lists of task names.
        num_random_stages (`int`, defaults to `3`):
            K for `staging="random"` (the paper's K = 3), capped at the number of tasks.
        freeze_cores (`bool` or `None`, defaults to `None`):
            Freeze earlier stages' cores. `None` means True for `"dpi"` and False for the baselines.
        task_column (`str`, defaults to `"task"`):
            Column that names each example's task when a single dataset holds several tasks.
        masks_from (`str` or `None`, defaults to `None`):
            A directory (a previous run's `output_dir`, or its `dpi/` folder) or a Hub repo id whose cores are reused,
            skipping the probes. Its fingerprint must match the model and it must have a core for every task.
        save_stage_models (`bool`, defaults to `False`):
            Save the model after each stage `k` in `output_dir/stage-<k>/` (safetensors).
        core_signal (`str`, defaults to `"fisher"`):
            The importance that ranks elements into a core: `"fisher"` (Σ g², the squared gradients of the probe's
            optimizer steps, accumulated in float32), `"gradsum"` (|Σ g|) or `"update"` (the paper's |θ − θ0| after
            the probe). Measured on SmolLM2-135M, Σ g² cores reproduce across disjoint halves of a task's data far
            better than |θ − θ0| cores for the same probe length (docs/results.md, "Are the cores reliable?").
        probe_reliability (`str`, defaults to `"split_half"`):
            `"split_half"`: one probe per task whose batches alternate between two disjoint halves of the task's rows,
            each half's gradients going into an importance accumulator of its own (a gradient `core_signal`; with
            `"update"` the two halves are two probes from θ0, each `probe_steps` long). It reports the reliability r
            (the Jaccard of the two half-cores, each from half the probe's batches), its Spearman–Brown estimate for
            the core actually used, and the reliability-corrected overlaps; the task's core is selected from the
            pooled importance of the whole pass. Costs nothing beyond the probe itself (one more accumulator).
            `"none"`: one probe per task on all its rows.
        overlap (`str`, defaults to `"corrected"`):
            The matrix the groups form on: `"corrected"` (half-level overlap divided by sqrt(r_a·r_b) ≥
            `jaccard_threshold`, needs `probe_reliability="split_half"`), `"raw"` (the Jaccard of the pooled cores ≥
            `jaccard_threshold`) or `"affinity"` (the tasks' first-order TAG affinity > `affinity_threshold`, needs
            `probe_affinity`; docs/method.md).
        probe_affinity (`bool` or `None`, defaults to `None`):
            Record each task's signed gradient sum during its probe (a gradient `core_signal`) and store the tasks'
            gradient dot products and losses in `plan.json`, so that `overlap="affinity"` can group on them now or
            `dpi-hf plan RUN --overlap affinity` later. Costs one float32 buffer per considered element on the
            parameter's device during a Σg² probe, and one model-sized float32 file per task under `_dpi_runs/`
            until the last probe ends. `None`: True when `overlap="affinity"`.
        affinity_threshold (`float`, defaults to `0.0`):
            With `overlap="affinity"`, tasks whose symmetric affinity η ḡ_i·ḡ_j (1/L_i + 1/L_j)/2 is above this
            share a group (0: a training step on either task lowers the other's loss).
        strict_reliability (`bool`, defaults to `False`):
            Stop with an error, before any stage trains, when a task's core is not clearly more reproducible than
            chance and than its overlap with other tasks (by default that is a warning).
        probe_optim (`str` or `None`, defaults to `None`):
            Optimizer of the probes (a `TrainingArguments.optim` name); `None` uses `optim`.
        probe_weight_decay (`float`, defaults to `0.0`):
            Weight decay of the probes; 0 so that decay does not enter |θ − θ0|.
        probe_warmup_steps (`int`, defaults to `0`):
            Warm-up steps of the probes.
        probe_lr_scheduler_type (`str`, defaults to `"constant"`):
            Learning-rate schedule of the probes (a probe that decays to 0 weighs its last steps less).
        probe_batch_size (`int` or `None`, defaults to `None`):
            Per-device batch size of the probes; `None` uses `per_device_train_batch_size`.
        probe_updates_weights (`bool` or `None`, defaults to `None`):
            Whether the probes take optimizer steps (a short fine-tune). `False`, with a gradient `core_signal`
            (`"fisher"` or `"gradsum"`): each probe accumulates the gradients of `probe_steps` batches at the current
            weights and never steps, so the model does not move, no θ0 copy is kept and no optimizer state is built.
            Measured on SmolLM2-135M, Σ g² at the current weights is at least as reproducible as Σ g² over a probe
            fine-tune of the same length (r = 0.43–0.75 at 16 batches against 0.40–0.54), and its cores protect as
            well (docs/results.md). `None`: False for a gradient `core_signal` without fusion, True otherwise
            (`"update"` needs steps to move θ; `fusion="cpi"` fuses the fine-tuned probe models).
        protect_cores_from (`str` or `None`, defaults to `None`):
            A directory (a run's `output_dir` or its `dpi/` folder, e.g. from `probe_cores` or `dpi-hf probe`) or a
            Hub repo id whose cores stay frozen, bit-exact, for the whole training: with one dataset DPITrainer is
            SFTTrainer plus this protection; with several tasks the protected elements are frozen in every stage, on
            top of the earlier stages' cores (probes still measure the tasks unfrozen). The cores must have been
            computed on this model's weights (the fingerprint and content check; `allow_mask_mismatch` accepts
            other weights of the same architecture and records it).
        protect_tasks (`list[str]` or `None`, defaults to `None`):
            The cores of `protect_cores_from` to protect, by task name; `None` protects all of them.
        protect_method (`str`, defaults to `"freeze"`):
            How the protected tasks are kept: `"freeze"` (their cores frozen bit-exactly), `"ewc"` (no freezing; the
            penalty λ/2 · Σ F_i (θ_i − θ_A,i)² with F the stored importance of the protected tasks, each normalised to
            mean 1 over its considered elements, summed over `protect_tasks`; needs `dpi/importance.safetensors`,
            written by `save_importance=True`), `"freeze_ewc"` (the cores frozen bit-exactly and the penalty on every
            other element) or `"l2sp"` (the penalty with F = 1: a uniform pull, no stored importance needed). θ_A is
            the model's weights when the trainer is built (the weights the cores were probed on).
        protect_lambda (`float` or `None`, defaults to `None`):
            λ ≥ 0, the penalty's strength; required with `"ewc"`, `"freeze_ewc"` and `"l2sp"`, refused with `"freeze"`.
        protect_ewc_form (`str`, defaults to `"loss"`):
            `"loss"`: the penalty's gradient λ F (θ − θ_A) is added to the gradients once per optimizer step (after
            gradient clipping, before the step), so the optimizer treats it like any gradient (Adam rescales it per
            element). `"decoupled"`: after each optimizer step θ ← θ − min(1, lr · λ · F) · (θ − θ_A), the way AdamW
            applies weight decay, which no optimizer rescales.
        protect_ewc_scope (`str`, defaults to `"all"`):
            `"all"`: F over every considered element; `"core"`: F kept only on the protected cores' elements (0
            elsewhere; then θ_A and F are stored for those elements only).
        save_importance (`bool`, defaults to `False`):
            Write `dpi/importance.safetensors` after the probes: each task's importance (the mean over its probe's
            optimizer steps of `core_signal`), bfloat16, 2 bytes per considered element per task — the source of
            `protect_method="ewc"` and of cores at other p without probing again (`probe_cores(importance_from=...)`).
        overwrite_output_dir (`bool`, defaults to `False`):
            A fresh (not resumed) multi-task run in an `output_dir` that holds another run's DPI state stops with an
            error unless this is True; then that state (probe and stage checkpoints, cores, plan) is deleted first.
        allow_mask_mismatch (`bool`, defaults to `False`):
            Accept `masks_from` (and `protect_cores_from`) masks computed on other weights of the same architecture (e.g. a base model's masks on
            its chat variant) or with other core settings; the mismatch is recorded in `plan.json` and the card.
        fusion (`str`, defaults to `"none"`):
            `"cpi"` (CPI-FT, arXiv 2508.21741): keep the models the probes fine-tuned and, after the plan, start the
            stages from their fusion instead of θ0 — each group's core elements copied from the group's model (the
            data-size-weighted SLERP of its tasks' probe models, split-half probes included), an element in several
            groups' cores going to the group with the largest importance there, every other element the SLERP of
            the groups' task vectors (docs/method.md, "CPI fusion"). Needs probes from this run (not `masks_from`).
            Writes `dpi/transplant.safetensors` and, with `save_stage_models`, `fused/`. `"none"`: stages start
            from θ0.
        fusion_factor (`float`, defaults to `1.0`):
            λ in (0, 2]: the scale of the merged task vector on the non-core elements (θ0 + λ·SLERP); core elements
            are copied unscaled. 1 is the plain SLERP. Only with `fusion="cpi"`.
        fusion_stage_fraction (`float`, defaults to `1.0`):
            The share, in (0, 1], of the staged budget (`max_steps`, or `num_train_epochs`) the stages get after
            the fusion. 1 keeps the stage budget of a run without fusion, so that the two differ only in where the
            stages start; a smaller share spends less on top of the probes, which with fusion are training too.
            Only with `fusion="cpi"`.
    """

    staging: str = field(
        default="dpi",
        metadata={"help": "How tasks become stages.", "choices": list(STRATEGIES)},
    )
    core_fraction: float = field(
        default=0.01, metadata={"help": "Fraction p of parameter elements in a task's core region, in (0, 1]."}
    )
    jaccard_threshold: float | None = field(
        default=None,
        metadata={"help": "Overlap τ in [0, 1] at which two tasks share a stage (default: 0.7 corrected, 0.1 raw)."},
    )
    core_scope: str = field(
        default="global",
        metadata={"help": "Select the top p globally or in each tensor.", "choices": list(CORE_SCOPES)},
    )
    core_include: list[str] | None = field(
        default=None, metadata={"help": "Parameter-name patterns to consider (default: all trainable)."}
    )
    core_exclude: list[str] | None = field(default=None, metadata={"help": "Parameter-name patterns to leave out."})
    probe_steps: int = field(default=100, metadata={"help": "Optimizer steps of each task's probe fine-tune."})
    probe_epochs: float | None = field(
        default=None, metadata={"help": "Probe length in epochs (overrides probe_steps)."}
    )
    probe_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the probes (default: learning_rate)."}
    )
    stage_order: str = field(
        default="given", metadata={"help": "Order of the DPI stages.", "choices": list(STAGE_ORDERS)}
    )
    stage_groups: list[list[str]] | None = field(
        default=None, metadata={"help": "Stages for staging='given', as lists of task names."}
    )
    num_random_stages: int = field(default=3, metadata={"help": "K for staging='random'."})
    freeze_cores: bool | None = field(
        default=None, metadata={"help": "Freeze earlier stages' cores (default: True for dpi, False otherwise)."}
    )
    task_column: str = field(default="task", metadata={"help": "Column naming each example's task."})
    masks_from: str | None = field(
        default=None, metadata={"help": "Directory or Hub repo id whose saved cores are reused (skips probes)."}
    )
    save_stage_models: bool = field(
        default=False, metadata={"help": "Save the model after each stage in output_dir/stage-<k>/."}
    )

    core_signal: str = field(
        default=DEFAULT_SIGNAL,
        metadata={"help": "Importance that ranks elements into a core.", "choices": list(SIGNAL_REGISTRY)},
    )
    probe_reliability: str = field(
        default="split_half",
        metadata={"help": "Measure each core's split-half reliability.", "choices": list(RELIABILITY_MODES)},
    )
    overlap: str = field(
        default="corrected", metadata={"help": "Matrix the groups form on.", "choices": list(OVERLAPS)}
    )
    strict_reliability: bool = field(
        default=False, metadata={"help": "Error (not warning) when a task's core is not reliable."}
    )
    probe_optim: str | None = field(default=None, metadata={"help": "Optimizer of the probes (default: optim)."})
    probe_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the probes."})
    probe_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the probes."})
    probe_lr_scheduler_type: str = field(default="constant", metadata={"help": "LR schedule of the probes."})
    probe_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device batch size of the probes (default: per_device_train_batch_size)."}
    )
    probe_updates_weights: bool | None = field(
        default=None,
        metadata={"help": "Probes take optimizer steps; False: gradient signals at the current weights, no step "
                          "(default: False for fisher/gradsum without fusion)."},
    )
    protect_cores_from: str | None = field(
        default=None, metadata={"help": "Directory or Hub repo id whose cores stay frozen for the whole training."}
    )
    protect_tasks: list[str] | None = field(
        default=None, metadata={"help": "Cores of protect_cores_from to protect, by task (default: all)."}
    )
    protect_method: str = field(
        default="freeze",
        metadata={"help": "How protect_cores_from protects: freeze, ewc, freeze_ewc or l2sp.",
                  "choices": list(PROTECT_METHODS)},
    )
    protect_lambda: float | None = field(
        default=None, metadata={"help": "λ >= 0 of the ewc / freeze_ewc / l2sp penalty."}
    )
    protect_ewc_form: str = field(
        default="loss",
        metadata={"help": "The penalty as a gradient (loss) or a pull after each step (decoupled).",
                  "choices": list(EWC_FORMS)},
    )
    protect_ewc_scope: str = field(
        default="all", metadata={"help": "The penalty on every element (all) or on the cores only (core).",
                                 "choices": list(EWC_SCOPES)},
    )
    save_importance: bool = field(
        default=False, metadata={"help": "Write dpi/importance.safetensors (bf16 mean importance) after the probes."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete another run's DPI state in output_dir before a fresh run."}
    )
    allow_mask_mismatch: bool = field(
        default=False,
        metadata={"help": "Accept masks_from masks from other weights/settings (recorded in plan.json and card)."},
    )
    fusion: str = field(
        default="none",
        metadata={"help": "Start the stages from the CPI-FT fusion of the probe models ('cpi').",
                  "choices": list(FUSIONS)},
    )
    fusion_factor: float = field(
        default=1.0, metadata={"help": "Scale λ in (0, 2] of the merged task vector on non-core elements."}
    )
    fusion_stage_fraction: float = field(
        default=1.0, metadata={"help": "Share in (0, 1] of the staged budget spent after the fusion."}
    )
    probe_affinity: bool | None = field(
        default=None,
        metadata={"help": "Record the tasks' gradient dot products for overlap='affinity' (default: when it is "
                          "the overlap)."},
    )
    affinity_threshold: float = field(
        default=DEFAULT_AFFINITY_THRESHOLD,
        metadata={"help": "overlap='affinity': tasks with symmetric affinity above this share a group."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_dpi()

    def validate_dpi(self) -> None:
        """Check the DPI fields; raise :class:`DPIConfigError` naming the field and the fix."""
        if self.staging not in STRATEGIES:
            raise DPIConfigError(f"staging={self.staging!r} is not one of {STRATEGIES}.")
        self.core_fraction = validate_core_fraction(self.core_fraction)
        if self.jaccard_threshold is None and self.overlap in OVERLAPS:  # the measured default of its scale
            self.jaccard_threshold = default_jaccard_threshold(self.overlap)
        self.jaccard_threshold = validate_jaccard_threshold(self.jaccard_threshold)
        if self.core_scope not in CORE_SCOPES:  # named after the config field, not validate_scope's argument
            raise DPIConfigError(f"core_scope={self.core_scope!r} is not one of {CORE_SCOPES}.")
        if self.stage_order not in STAGE_ORDERS:
            raise DPIConfigError(f"stage_order={self.stage_order!r} is not one of {STAGE_ORDERS}.")
        if self.probe_epochs is None and (not isinstance(self.probe_steps, int) or self.probe_steps < 1):
            raise DPIConfigError(f"probe_steps={self.probe_steps!r} must be a positive integer (or set probe_epochs).")
        if self.probe_epochs is not None and not self.probe_epochs > 0:
            raise DPIConfigError(f"probe_epochs={self.probe_epochs!r} must be positive.")
        if self.probe_learning_rate is not None and not self.probe_learning_rate > 0:
            raise DPIConfigError(f"probe_learning_rate={self.probe_learning_rate!r} must be positive.")
        if self.num_random_stages < 1:
            raise DPIConfigError(f"num_random_stages={self.num_random_stages!r} must be at least 1.")
        if self.staging == "given" and not self.stage_groups:
            raise DPIConfigError("staging='given' needs stage_groups, e.g. [['gsm8k', 'logiqa'], ['code', 'alpaca']].")
        if self.stage_groups is not None and self.staging != "given":
            raise DPIConfigError(f"stage_groups is only used with staging='given' (staging is {self.staging!r}).")
        validate_signal(self.core_signal)
        if self.probes_split_half and get_signal(self.core_signal).reads_gradients and self.probe_epochs is None \
                and isinstance(self.probe_steps, int) and self.probe_steps < 2:
            raise DPIConfigError(
                f"probe_steps={self.probe_steps} leaves the second half without a step: a split-half probe alternates "
                "its steps between the two halves of a task's rows; set probe_steps >= 2 (or probe_reliability="
                "'none' and overlap='raw')."
            )
        if self.probe_reliability not in RELIABILITY_MODES:
            raise DPIConfigError(f"probe_reliability={self.probe_reliability!r} is not one of {RELIABILITY_MODES}.")
        if self.overlap not in OVERLAPS:
            raise DPIConfigError(f"overlap={self.overlap!r} is not one of {OVERLAPS}.")
        if self.overlap == "corrected" and self.probe_reliability != "split_half" and self.masks_from is None:
            raise DPIConfigError(
                "overlap='corrected' needs probe_reliability='split_half' (the correction divides by each task's "
                "split-half reliability); set probe_reliability='split_half' or overlap='raw'."
            )
        if self.strict_reliability and self.probe_reliability != "split_half" and self.masks_from is None:
            raise DPIConfigError("strict_reliability=True needs probe_reliability='split_half' to measure reliability.")
        if self.fp16 and get_signal(self.core_signal).reads_gradients and self.needs_probes and self.masks_from is None:
            raise DPIConfigError(
                f"core_signal={self.core_signal!r} reads the probes' gradients, which fp16 loss scaling leaves scaled "
                "(and inf on overflow steps); use bf16 or float32, or core_signal='update'."
            )
        if not (isinstance(self.probe_weight_decay, (int, float)) and self.probe_weight_decay >= 0):
            raise DPIConfigError(f"probe_weight_decay={self.probe_weight_decay!r} must be a number >= 0.")
        if not (isinstance(self.probe_warmup_steps, int) and self.probe_warmup_steps >= 0):
            raise DPIConfigError(f"probe_warmup_steps={self.probe_warmup_steps!r} must be an integer >= 0.")
        if self.probe_batch_size is not None and not (isinstance(self.probe_batch_size, int)
                                                      and self.probe_batch_size >= 1):
            raise DPIConfigError(f"probe_batch_size={self.probe_batch_size!r} must be a positive integer or None.")
        if self.probe_updates_weights is None:  # no-step Σg² where it measured as reliable; steps where needed
            self.probe_updates_weights = not (get_signal(self.core_signal).reads_gradients and self.fusion == "none")
        if not isinstance(self.probe_updates_weights, bool):
            raise DPIConfigError(f"probe_updates_weights={self.probe_updates_weights!r} must be True or False.")
        if not self.probe_updates_weights and get_signal(self.core_signal).needs_steps and self.needs_probes \
                and self.masks_from is None:
            raise DPIConfigError(
                f"probe_updates_weights=False takes no optimizer step, so {get_signal(self.core_signal).formula} "
                f"(core_signal={self.core_signal!r}) is zero everywhere; use a gradient signal (core_signal="
                f"{' or '.join(map(repr, gradient_signals()))}) or probe_updates_weights=True."
            )
        if isinstance(self.protect_tasks, str):
            self.protect_tasks = [self.protect_tasks]
        if self.protect_tasks is not None:
            if self.protect_cores_from is None:
                raise DPIConfigError(
                    "protect_tasks names cores to protect but protect_cores_from is not set; set protect_cores_from "
                    "to the directory or Hub repo id that holds them."
                )
            if not self.protect_tasks or not all(isinstance(t, str) and t for t in self.protect_tasks):
                raise DPIConfigError(
                    f"protect_tasks={self.protect_tasks!r} must be a non-empty list of task names (or None: all)."
                )
        if self.protect_cores_from is not None and (not isinstance(self.protect_cores_from, str)
                                                    or not self.protect_cores_from.strip()):
            raise DPIConfigError(
                f"protect_cores_from={self.protect_cores_from!r} must be a directory or a Hub repo id."
            )
        self._validate_protection()
        self._validate_fusion()
        self._validate_affinity()
        for field_name in ("core_include", "core_exclude"):
            v = getattr(self, field_name)
            if isinstance(v, str):
                setattr(self, field_name, [v])

    def _validate_protection(self) -> None:
        m = self.protect_method
        if m not in PROTECT_METHODS:
            raise DPIConfigError(f"protect_method={m!r} is not one of {PROTECT_METHODS}.")
        if m != "freeze" and self.protect_cores_from is None:
            raise DPIConfigError(
                f"protect_method={m!r} protects the tasks of protect_cores_from, which is not set; set "
                "protect_cores_from to the directory that holds their cores (and importance), or drop protect_method."
            )
        lam = self.protect_lambda
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
            raise DPIConfigError(f"protect_lambda={lam!r} must be a number >= 0 (the penalty's strength λ).")
        if m in ANCHOR_METHODS and lam is None:
            raise DPIConfigError(f"protect_method={m!r} needs protect_lambda (λ >= 0, the penalty's strength).")
        if m not in ANCHOR_METHODS and lam is not None:
            raise DPIConfigError(
                f"protect_lambda is the strength of a penalty, and protect_method={m!r} has none; set protect_method "
                f"to one of {ANCHOR_METHODS} or drop protect_lambda."
            )
        if self.protect_ewc_form not in EWC_FORMS:
            raise DPIConfigError(f"protect_ewc_form={self.protect_ewc_form!r} is not one of {EWC_FORMS}.")
        if self.protect_ewc_scope not in EWC_SCOPES:
            raise DPIConfigError(f"protect_ewc_scope={self.protect_ewc_scope!r} is not one of {EWC_SCOPES}.")
        for name, default in (("protect_ewc_form", "loss"), ("protect_ewc_scope", "all")):
            if getattr(self, name) != default and m not in ANCHOR_METHODS:
                raise DPIConfigError(f"{name} is only used with protect_method in {ANCHOR_METHODS} (it is {m!r}); "
                                     f"drop {name}.")
        if m == "freeze_ewc" and self.protect_ewc_scope == "core":
            raise DPIConfigError(
                "protect_method='freeze_ewc' freezes the cores and puts the penalty on every other element; with "
                "protect_ewc_scope='core' nothing would be left to pull. Use protect_method='ewc' with scope 'core', "
                "or scope 'all'."
            )
        if not isinstance(self.save_importance, bool):
            raise DPIConfigError(f"save_importance={self.save_importance!r} must be True or False.")
        if self.save_importance and (self.masks_from is not None or not self.needs_probes):
            raise DPIConfigError(
                "save_importance=True stores what the probes measure, and this run probes nothing ("
                f"{'masks_from reuses saved cores' if self.masks_from is not None else f'staging={self.staging!r} without freeze_cores'}"
                "); drop save_importance, or probe (drop masks_from / use staging='dpi')."
            )

    @property
    def anchors(self) -> bool:
        """Whether this run pulls the weights towards θ_A (protect_method ewc, freeze_ewc or l2sp)."""
        return self.protect_cores_from is not None and self.protect_method in ANCHOR_METHODS

    @property
    def freezes_protected(self) -> bool:
        """Whether this run keeps the protected cores frozen (protect_method freeze or freeze_ewc)."""
        return self.protect_cores_from is not None and self.protect_method in ("freeze", "freeze_ewc")

    def _validate_fusion(self) -> None:
        if self.fusion not in FUSIONS:
            raise DPIConfigError(f"fusion={self.fusion!r} is not one of {FUSIONS}.")
        f = self.fusion_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 2:
            raise DPIConfigError(
                f"fusion_factor={f!r} must be a number in (0, 2]: the scale of the merged task vector (1 = plain "
                "SLERP; above 2 would extrapolate far past every probe model)."
            )
        r = self.fusion_stage_fraction
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise DPIConfigError(f"fusion_stage_fraction={r!r} must be a number in (0, 1] (1 = the full budget).")
        if self.fusion == "none":
            for name in ("fusion_factor", "fusion_stage_fraction"):
                if getattr(self, name) != 1.0:
                    raise DPIConfigError(f"{name} is only used with fusion='cpi' (fusion is 'none'); set "
                                         f"fusion='cpi' or drop {name}.")
            return
        if self.masks_from is not None:
            raise DPIConfigError(
                "fusion='cpi' fuses the models this run's probes fine-tune, and masks_from skips the probes; drop "
                "masks_from or set fusion='none'."
            )
        if not self.needs_probes:
            raise DPIConfigError(
                f"fusion='cpi' fuses the probes' models, and staging={self.staging!r} without freeze_cores runs no "
                "probe; use staging='dpi', set freeze_cores=True, or set fusion='none'."
            )
        if not self.probe_updates_weights:
            raise DPIConfigError(
                "fusion='cpi' fuses the models the probes fine-tune, and probe_updates_weights=False takes no step "
                "(every probe model would be θ0); set probe_updates_weights=True or fusion='none'."
            )

    def _validate_affinity(self) -> None:
        self.affinity_threshold = validate_affinity_threshold(self.affinity_threshold)
        if self.probe_affinity is None:
            self.probe_affinity = self.overlap == "affinity"
        if not isinstance(self.probe_affinity, bool):
            raise DPIConfigError(f"probe_affinity={self.probe_affinity!r} must be True, False or None.")
        probes_here = self.needs_probes and self.masks_from is None
        if self.overlap == "affinity" and probes_here and not self.probe_affinity:
            raise DPIConfigError(
                "overlap='affinity' groups on the tasks' gradient dot products, which probe_affinity=False does not "
                "record; set probe_affinity=True (or leave it unset) or pick overlap='corrected'."
            )
        if self.probe_affinity and probes_here and not get_signal(self.core_signal).reads_gradients:
            raise DPIConfigError(
                f"probe_affinity reads the probes' gradients, and core_signal={self.core_signal!r} reads none; use "
                "core_signal='fisher' (or 'gradsum'), or set probe_affinity=False and overlap='corrected'."
            )

    @property
    def stage_max_steps(self) -> int:
        """The staged training's ``max_steps``: ``max_steps``, times ``fusion_stage_fraction`` with fusion (rounded,
        at least 1); ≤ 0 when the budget is in epochs."""
        if self.fusion == "none" or self.max_steps is None or self.max_steps <= 0:
            return self.max_steps
        return max(1, int(self.max_steps * self.fusion_stage_fraction + 0.5))

    @property
    def stage_num_train_epochs(self) -> float:
        """The staged training's ``num_train_epochs``, times ``fusion_stage_fraction`` with fusion."""
        return self.num_train_epochs * (self.fusion_stage_fraction if self.fusion == "cpi" else 1.0)

    @property
    def freezes(self) -> bool:
        """Whether stages freeze earlier stages' cores."""
        return self.staging == "dpi" if self.freeze_cores is None else bool(self.freeze_cores)

    @property
    def needs_probes(self) -> bool:
        """Whether this run needs the tasks' cores (to plan or to freeze)."""
        return self.staging == "dpi" or self.freezes

    @property
    def protects(self) -> bool:
        """Whether this run keeps the cores of ``protect_cores_from`` frozen."""
        return self.protect_cores_from is not None

    @property
    def probes_split_half(self) -> bool:
        """Whether this run probes each task on two halves of its rows (it probes, and does so split-half)."""
        return self.needs_probes and self.masks_from is None and self.probe_reliability == "split_half"
