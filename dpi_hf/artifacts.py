"""DPI artifacts next to the model: cores, plan, overlap heatmap and a model-card section.

Layout inside a run's ``output_dir`` (and a Hub repo pushed from it)::

    dpi/cores.safetensors   one core per task (dpi_hf.load_cores)
    dpi/plan.json           tasks, stages, groups, jaccard, core_fraction, jaccard_threshold, core_scope,
                            frozen counts per stage, model fingerprint, library versions
    dpi/overlap.png         Jaccard heatmap of the cores
    dpi/protected.json      with protect_cores_from: the cores kept frozen, their source and digest
    dpi/importance.safetensors  with save_importance=True: each task's mean importance per parameter (bfloat16)
    README.md               model card with a ``dpi:`` metadata block and a readable section
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .core import StagePlan, load_cores, model_fingerprint, read_cores_metadata, save_cores
from .core.errors import DPIConfigError, MaskFileError
from .core.io import atomic_write_text  # the one atomic writer, also importable from here
from .core.signals import SIGNAL_REGISTRY

DPI_DIR = "dpi"
CORES_FILE = "cores.safetensors"
PLAN_FILE = "plan.json"
HEATMAP_FILE = "overlap.png"
PROTECTED_FILE = "protected.json"
IMPORTANCE_FILE = "importance.safetensors"
IMPORTANCE_FORMAT = "dpi-hf/importance"
IMPORTANCE_FORMAT_VERSION = 1
IMPORTANCE_DTYPE = "bfloat16"
CARD_SECTION_START = "<!-- dpi-hf:start -->"
CARD_SECTION_END = "<!-- dpi-hf:end -->"
DATA_SECTION_START = "<!-- dpi-hf:data:start -->"
DATA_SECTION_END = "<!-- dpi-hf:data:end -->"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dpi-hf", "torch", "transformers", "trl", "accelerate", "safetensors", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def plot_overlap(plan: StagePlan, path) -> Path:
    """Draw the overlap of ``plan`` as a heatmap PNG: the cores' Jaccard, and with a split-half reliability report
    also the reliability-corrected overlap, with each task's r and the random level in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plan.tasks)
    rel = plan.reliability
    panels = [("Core overlap (Jaccard)", plan.jaccard)]
    if rel is not None:
        panels.append(("Reliability-corrected overlap", rel.corrected_jaccard))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.2 * n + 2.5), 1.0 * n + 2.3), squeeze=False)
    labels = [f"{t}\nr={rel.reliability[t]:.2f}" if rel is not None else t for t in plan.tasks]
    for ax, (title, matrix) in zip(axes[0], panels):
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), plan.tasks, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                        fontsize=9)
        grouped = (plan.overlap == "corrected") == (matrix is not plan.jaccard)
        ax.set_title(title + (f", τ = {plan.jaccard_threshold}" if grouped else ""), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if rel is not None:
        fig.suptitle(f"split-half reliability r per task; random level p/(2−p) = {rel.random_level:.4f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_record(plan: StagePlan, model=None, fingerprint=None, **settings) -> dict:
    """The JSON content of ``plan.json``: the plan plus settings, fingerprint and versions.

    ``fingerprint`` (a :func:`~dpi_hf.core.model_fingerprint` computed beforehand, e.g. on every rank of a sharded
    model) is used instead of fingerprinting ``model`` again.
    """
    record = {**plan.to_dict(), **settings, "library_versions": library_versions()}
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    if fingerprint is not None:
        record["model_fingerprint"] = fingerprint["sha256"]
    return record


def save_dpi_artifacts(output_dir, cores, plan: StagePlan, model=None, fingerprint=None, **settings) -> Path:
    """Write ``dpi/cores.safetensors``, ``dpi/plan.json`` and ``dpi/overlap.png`` under ``output_dir``.

    Args:
        output_dir: the run's output directory.
        cores: task → CoreMask (may be None for plans that never probed).
        plan: the stage plan.
        model: the model the cores belong to (its fingerprint is stored).
        fingerprint: that model's fingerprint, computed beforehand (default None: computed from ``model``).
        **settings: stored in plan.json and the cores metadata, e.g. core_fraction, core_scope, staging.
    """
    dpi_dir = Path(output_dir) / DPI_DIR
    if cores:
        fingerprint = fingerprint if fingerprint is not None else (model_fingerprint(model) if model is not None else None)
        save_cores(cores, dpi_dir / CORES_FILE, **({"fingerprint": fingerprint} if fingerprint else {}), **settings)
    atomic_write_text(dpi_dir / PLAN_FILE, json.dumps(plan_record(plan, model, fingerprint, **settings), indent=2))
    if len(plan.tasks) > 1 and plan.jaccard:
        plot_overlap(plan, dpi_dir / HEATMAP_FILE)
    return dpi_dir


def find_dpi_dir(path) -> Path:
    """The ``dpi/`` folder of a run directory (or the folder itself)."""
    p = Path(path)
    for cand in (p / DPI_DIR, p):
        if (cand / CORES_FILE).is_file() or (cand / PLAN_FILE).is_file() or (cand / IMPORTANCE_FILE).is_file():
            return cand
    raise MaskFileError(
        f"no DPI artifacts in {str(p)!r}: expected {DPI_DIR}/{CORES_FILE} and {DPI_DIR}/{PLAN_FILE} (the output_dir of a "
        "DPI run). Check the path, or run the probes first."
    )


def resolve_masks_source(source: str, token=None, revision=None) -> Path:
    """A local ``dpi/`` folder for ``source``: a local directory, or a Hub repo id (downloads only ``dpi/*``)."""
    if os.path.exists(source):
        return find_dpi_dir(source)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=source, allow_patterns=[f"{DPI_DIR}/*"], token=token, revision=revision)
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise DPIConfigError(
            f"masks_from={source!r} is not a local directory and could not be downloaded from the Hub "
            f"({type(e).__name__}: {e}). Pass the output_dir of a DPI run or a Hub repo id that holds dpi/."
        ) from None
    return find_dpi_dir(local)


def load_dpi_artifacts(path, model=None, tasks=None, check_content: bool = False):
    """Load ``(cores, plan)`` from a run directory, its ``dpi/`` folder, or a Hub repo id.

    Args:
        path: local directory or Hub repo id.
        model: if given, the cores' fingerprint (names and shapes) is checked against it.
        tasks: tasks that must be present (a missing one is an error naming it).
        check_content: with ``model``, also require the weights the masks were computed on (the content digest);
            default False.
    """
    dpi_dir = resolve_masks_source(str(path))
    cores = None
    if (dpi_dir / CORES_FILE).is_file():
        saved = read_cores_metadata(dpi_dir / CORES_FILE)["tasks"]
        missing = [t for t in (tasks or []) if t not in saved]
        if missing:
            raise DPIConfigError(
                f"masks in {str(dpi_dir)!r} have no core for tasks {missing} (they hold {saved}); probe those tasks "
                "(drop masks_from) or name tasks that match."
            )
        cores = load_cores(dpi_dir / CORES_FILE, model=model, tasks=tasks, check_content=check_content)
    plan = None
    if (dpi_dir / PLAN_FILE).is_file():
        plan = StagePlan.from_json((dpi_dir / PLAN_FILE).read_text())
        if cores is not None and all(t in cores for t in plan.tasks):
            plan.attach_cores(cores)
    return cores, plan


def save_importance(output_dir, importance, batches, *, signal: str, fingerprint=None, model=None,
                    **settings) -> Path:
    """Write ``output_dir/dpi/importance.safetensors``: each task's importance per parameter, in bfloat16.

    Layout: one tensor per (task, parameter) under the key ``"<task>/<parameter name>"``, in the parameter's shape;
    metadata ``format`` = ``"dpi-hf/importance"``, ``format_version``, and ``dpi`` = a JSON object with ``tasks``,
    ``batches`` (task → the number of optimizer steps the importance was accumulated over), ``signal``, ``statistic``
    (``"mean per optimizer step"``), the model ``fingerprint`` and any ``settings``. Size: 2 bytes per considered
    element per task (a model's bf16 size per task). The write is atomic.

    Args:
        output_dir: the run's output directory (the file goes in its ``dpi/``).
        importance: task → (parameter name → tensor): the MEAN of the signal over the probe's optimizer steps (the
            accumulated Σg² divided by ``batches[task]``), so that it does not scale with the probe's length.
        batches: task → the number of optimizer steps the mean is over (≥ 1).
        signal: the importance signal (``"fisher"``, ``"gradsum"`` or ``"update"``).
        fingerprint: the model's :func:`~dpi_hf.core.model_fingerprint` (default None: computed from ``model``).
        model: the probed model, when ``fingerprint`` is not given.
        **settings: JSON-serialisable extras stored in the metadata (e.g. the probe settings).
    """
    import torch

    from .core.io import atomic_save_file

    if not importance:
        raise DPIConfigError("save_importance needs the importance of at least one task.")
    tensors = {}
    for task, per_param in importance.items():
        if not isinstance(task, str) or not task or "/" in task:
            raise DPIConfigError(f"task name {task!r} must be a non-empty string without '/'.")
        n = batches.get(task) if isinstance(batches, dict) else None
        if not isinstance(n, int) or n < 1:
            raise DPIConfigError(f"batches[{task!r}]={n!r} must be the number (>= 1) of steps the mean is over.")
        for name, t in per_param.items():
            tensors[f"{task}/{name}"] = t.detach().to("cpu", torch.bfloat16).contiguous()
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    info = {**settings, "tasks": list(importance), "batches": {t: batches[t] for t in importance}, "signal": signal,
            "statistic": "mean per optimizer step", "dtype": IMPORTANCE_DTYPE, "fingerprint": fingerprint}
    path = Path(output_dir) / DPI_DIR / IMPORTANCE_FILE
    return atomic_save_file(tensors, path, metadata={"format": IMPORTANCE_FORMAT,
                                                     "format_version": str(IMPORTANCE_FORMAT_VERSION),
                                                     "dpi": json.dumps(info)})


def importance_path(source) -> Path | None:
    """The ``importance.safetensors`` of a run directory, its ``dpi/`` folder or a Hub repo id, or None."""
    path = resolve_masks_source(str(source)) / IMPORTANCE_FILE
    return path if path.is_file() else None


def read_importance_metadata(path) -> dict:
    """The ``dpi`` metadata of an importance file (tasks, batches, signal, fingerprint, settings)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # truncated or not a safetensors file
        raise MaskFileError(f"importance file {str(path)!r} is truncated or corrupt ({e}); probe again.") from None
    if meta.get("format") != IMPORTANCE_FORMAT or meta.get("format_version") != str(IMPORTANCE_FORMAT_VERSION):
        raise MaskFileError(f"{str(path)!r} is not a dpi-hf importance file of version {IMPORTANCE_FORMAT_VERSION} "
                            f"(format={meta.get('format')!r}, version={meta.get('format_version')!r}).")
    return json.loads(meta["dpi"])


def load_importance(source, tasks=None, model=None, check_content: bool = False):
    """Each task's stored importance, as float32 tensors: ``{task: {parameter name: tensor}}``.

    Args:
        source: a run directory, its ``dpi/`` folder, or a Hub repo id (downloads ``dpi/*``).
        tasks: the tasks to load (default None: all); a task the file lacks is an error naming the ones it has.
        model: if given, the stored fingerprint (names and shapes) is checked against it.
        check_content: with ``model``, also require the weights the importance was measured on (default False).

    Raises:
        DPIConfigError: no importance file (it is written by ``save_importance=True`` / ``probe_cores``), or an
            unknown task.
    """
    import torch
    from safetensors import safe_open

    from .core import check_fingerprint

    path = importance_path(source)
    if path is None:
        raise DPIConfigError(
            f"{str(source)!r} holds no {DPI_DIR}/{IMPORTANCE_FILE}: its importance was not stored. Probe with "
            "DPIConfig(save_importance=True) (probe_cores, dpi-hf probe or a DPI run) to write it."
        )
    info = read_importance_metadata(path)
    wanted = list(tasks) if tasks is not None else list(info["tasks"])
    unknown = [t for t in wanted if t not in info["tasks"]]
    if unknown:
        raise DPIConfigError(f"the importance in {str(path)!r} has no task {unknown}; it holds {info['tasks']}.")
    if model is not None and info.get("fingerprint"):
        check_fingerprint(info["fingerprint"], model, check_content=check_content)
    out = {t: {} for t in wanted}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            task, name = key.split("/", 1)
            if task in out:
                out[task][name] = f.get_tensor(key).to(torch.float32)
    return out


def protection_lines(protected: dict) -> list[str]:
    """Card lines saying which cores stayed frozen through the whole training, and from where."""
    method = protected.get("protect_method", "freeze")
    how = {
        "freeze": "stayed frozen bit for bit for the whole training",
        "ewc": f"were protected by an EWC penalty (λ = {protected.get('protect_lambda')}, form "
               f"`{protected.get('protect_ewc_form')}`, scope `{protected.get('protect_ewc_scope')}`) weighted by "
               "their stored importance, nothing frozen",
        "freeze_ewc": f"stayed frozen bit for bit, with an EWC penalty (λ = {protected.get('protect_lambda')}, form "
                      f"`{protected.get('protect_ewc_form')}`) on every other element",
        "l2sp": f"were protected by a uniform L2-SP pull to the starting weights (λ = {protected.get('protect_lambda')}"
                f", form `{protected.get('protect_ewc_form')}`, scope `{protected.get('protect_ewc_scope')}`), "
                "nothing frozen",
    }[method]
    lines = [
        f"Protected cores: the cores of {', '.join(f'`{t}`' for t in protected['tasks'])} from "
        f"`{protected['source']}` {how} ({protected['elements']:,} "
        f"elements, {100 * protected.get('fraction', 0.0):.3f}% of the parameters; cores file sha256 "
        f"`{protected['digest'][:12]}`, signal `{protected.get('settings', {}).get('core_signal', 'update')}`, "
        f"p = {protected.get('settings', {}).get('core_fraction')}).",
    ]
    if protected.get("reliability"):
        lines[0] += " Their split-half reliability r: " + ", ".join(
            f"{t} {r:.3f}" for t, r in protected["reliability"].items()) + "."
    if protected.get("other_weights"):
        lines.append(f"- **Accepted with allow_mask_mismatch:** protected cores computed on other weights: "
                     f"{protected['other_weights']}")
    return lines


def protection_section(protected: dict) -> str:
    """Markdown section of a single-dataset run (SFT) that kept another artifact's cores frozen."""
    return "\n".join([
        CARD_SECTION_START,
        "## Protected cores (dpi-hf)",
        "",
        "Fine-tuned with dpi-hf (Dynamic Parameter Isolation on the Hugging Face stack) as plain SFT on one "
        "dataset, with the core regions of earlier skills protected (frozen, or pulled towards their starting "
        "weights; see below) so that the new training does not overwrite them.",
        "",
        *protection_lines(protected),
        "",
        "What was protected: `dpi/protected.json`.",
        CARD_SECTION_END,
    ])


def card_section(plan: StagePlan | None, settings: dict) -> str:
    """Markdown section describing the DPI run, for the model card (``plan`` None: a protected single-dataset run,
    described by ``settings["protected"]``)."""
    if plan is None:
        return protection_section(settings["protected"])
    rows = [
        "| stage | tasks | frozen elements | frozen % |",
        "|---|---|---|---|",
    ]
    for k, stage in enumerate(plan.stages):
        cnt = plan.frozen_counts[k] if plan.frozen_counts else 0
        rows.append(f"| {k + 1} | {', '.join(stage)} | {cnt:,} | {100 * plan.frozen_fraction(k) if plan.frozen_counts else 0:.3f} |")
    probed_only = settings.get("stages_trained") is False
    lines = [
        CARD_SECTION_START,
        "## Dynamic Parameter Isolation (dpi-hf)",
        "",
        *(["**Probes and plan only: no stage has been trained yet** (`DPITrainer.probe()` / `dpi-hf probe`); the "
           "table shows the planned stages.", ""] if probed_only else []),
        f"{'Planned' if probed_only else 'Trained'} with dpi-hf (staging `{settings.get('staging', 'dpi')}`, "
        f"core fraction p = {settings.get('core_fraction')}, Jaccard threshold τ = {plan.jaccard_threshold}, "
        f"scope `{settings.get('core_scope', 'global')}`, signal `{settings.get('core_signal', 'update')}`). Each "
        "task's core region is the p share of parameter elements that matter most to it in a short probe fine-tune "
        "from the base weights (by the signal: "
        + ", ".join(f"{s.formula} = `{s.name}`" for s in SIGNAL_REGISTRY.values())
        + "); tasks with overlapping cores share a stage, and later stages keep earlier stages' cores frozen bit for "
        "bit.",
        "",
        *rows,
        "",
        f"Groups: {plan.groups}. Masks: `dpi/cores.safetensors`; plan: `dpi/plan.json`.",
    ]
    rel = plan.reliability
    if rel is not None:
        lines += [
            "",
            f"Core reliability (split-half Jaccard r; two random cores of this size overlap at {rel.random_level:.4f}): "
            + ", ".join(f"{t} {rel.reliability[t]:.3f}" for t in plan.tasks)
            + (f". Tasks were grouped on the {'reliability-corrected' if plan.overlap == 'corrected' else 'raw'} "
               "overlap." if settings.get("staging", "dpi") == "dpi" else "."),
        ]
        lines += [f"- **Unreliable core:** {m}" for m in rel.unreliable.values()]
    if settings.get("fusion") == "cpi":
        lines += ["", f"**Fusion (CPI-FT):** the stages started from one backbone fused from the probe models, not from "
                  "the base weights: each group's core elements copied from its own model (the SLERP of its tasks' "
                  "probe models), every other element the data-size-weighted SLERP of the groups' task vectors "
                  f"(λ = {settings.get('fusion_factor')}); the stages then trained "
                  f"{settings.get('fusion_stage_fraction')} of the budget. Transplant map: `{DPI_DIR}/transplant.safetensors`."]
        transplant = settings.get("fusion_transplant")
        if transplant:
            lines.append(f"Core elements owned per group: {transplant['owned']}; in several groups' cores: "
                         f"{transplant['contested']:,} (resolved by {'importance' if transplant['resolved_by'] == 'given' else '|θ − θ0|'}).")
    if settings.get("masks_from"):
        lines += ["", f"Cores reused from `{settings['masks_from']}` (not probed in this run)."]
        for key, what in (("masks_other_weights", "computed on other weights"),
                          ("masks_mismatch", "computed with other core settings")):
            if settings.get(key):
                lines.append(f"- **Accepted with allow_mask_mismatch:** masks {what}: {settings[key]}")
    if settings.get("protected"):
        lines += ["", *protection_lines(settings["protected"])]
    if len(plan.tasks) > 1 and plan.jaccard:
        lines += ["", f"![core overlap]({DPI_DIR}/{HEATMAP_FILE})"]
    lines.append(CARD_SECTION_END)
    return "\n".join(lines)


def write_model_card(output_dir, plan: StagePlan | None, settings: dict) -> Path:
    """Add (or replace) the DPI section and the ``dpi:`` metadata block in ``output_dir/README.md``, with the Hub
    metadata of a text-generation model (``pipeline_tag``, and ``base_model`` when ``settings["base_model"]`` names
    a Hub id; see :func:`dpi_hf.offline.hub_model_id`).

    ``plan`` is None for a single-dataset run with protected cores (``settings["protected"]`` describes them)."""
    card = _load_card(output_dir)
    path = Path(output_dir) / "README.md"
    settings = dict(settings)
    base_model = settings.pop("base_model", None)
    if base_model:
        card.data.base_model = base_model
    protected = settings.get("protected")
    protected_meta = {"protected": {k: protected[k] for k in ("source", "tasks", "elements", "digest",
                                                              "protect_method", "protect_lambda") if k in protected}} \
        if protected else {}
    if plan is None:
        card.data.dpi = {**protected_meta,
                         **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    else:
        card.data.dpi = {
            "tasks": plan.tasks,
            "stages": plan.stages,
            "jaccard_threshold": plan.jaccard_threshold,
            "overlap": plan.overlap,
            "frozen_counts": plan.frozen_counts,
            **({"reliability": plan.reliability.reliability, "random_level": plan.reliability.random_level,
                "unreliable_tasks": sorted(plan.reliability.unreliable)} if plan.reliability is not None else {}),
            **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, type(None)))},
            **protected_meta,
        }
    tags = list(card.data.tags or [])
    for tag in ("dpi-hf", "dynamic-parameter-isolation"):
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    text = card.text
    if CARD_SECTION_START in text:
        before, rest = text.split(CARD_SECTION_START, 1)
        after = rest.split(CARD_SECTION_END, 1)[1] if CARD_SECTION_END in rest else ""
        text = before + card_section(plan, settings) + after
    else:
        text = text.rstrip() + "\n\n" + card_section(plan, settings) + "\n"
    card.text = text
    card.save(path)
    return path


def _load_card(output_dir):
    """``output_dir/README.md`` as a ``ModelCard`` (a new one when there is none), marked as a text-generation
    model."""
    from huggingface_hub import ModelCard

    path = Path(output_dir) / "README.md"
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\nlibrary_name: transformers\n---\n\n# {Path(output_dir).name}\n")
    card.data.pipeline_tag = "text-generation"
    return card


def write_card_training_data(output_dir, hub_datasets: list[str], other_data: list[str],
                             base_model: str | None = None) -> Path:
    """Name a run's base model and training data in ``output_dir/README.md``: ``base_model`` and the Hub ids of the
    Hub-sourced tasks as the card's ``datasets`` (the Hub links both), and every task's source in the card's text
    (generated tasks and local files have no Hub id to link).

    Args:
        hub_datasets: Hub dataset ids (``openai/gsm8k``, ...); none: no ``datasets`` entry.
        other_data: one line per task that is not on the Hub, e.g. ``"chain_sum: generated with reasoning-gym"``.
        base_model: the Hub id of the model the run started from (default None: left as the card has it; a local
            path is never a Hub id, see :func:`dpi_hf.offline.hub_model_id`).
    """
    card = _load_card(output_dir)
    path = Path(output_dir) / "README.md"
    if base_model:
        card.data.base_model = base_model
    if hub_datasets:
        card.data.datasets = list(dict.fromkeys(hub_datasets))
    lines = [DATA_SECTION_START, "## Training data", ""]
    lines += [f"- Hub dataset [{d}](https://huggingface.co/datasets/{d})" for d in dict.fromkeys(hub_datasets)]
    lines += [f"- {line}" for line in other_data]
    lines.append(DATA_SECTION_END)
    text = card.text
    if DATA_SECTION_START in text:
        before, rest = text.split(DATA_SECTION_START, 1)
        after = rest.split(DATA_SECTION_END, 1)[1] if DATA_SECTION_END in rest else ""
        text = before + "\n".join(lines) + after
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    card.text = text
    card.save(path)
    return path
