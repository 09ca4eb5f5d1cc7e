"""DPI artifacts next to the model: cores, plan, overlap heatmap and a model-card section.

Layout inside a run's ``output_dir`` (and a Hub repo pushed from it)::

    dpi/cores.safetensors   one core per task (dpi_hf.load_cores)
    dpi/plan.json           tasks, stages, groups, jaccard, core_fraction, jaccard_threshold, core_scope,
                            frozen counts per stage, model fingerprint, library versions
    dpi/overlap.png         Jaccard heatmap of the cores
    README.md               model card with a ``dpi:`` metadata block and a readable section
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .core import StagePlan, load_cores, model_fingerprint, read_cores_metadata, save_cores
from .core.errors import DPIConfigError, MaskFileError
from .core.io import atomic_write_text  # the one atomic writer, also importable from here

DPI_DIR = "dpi"
CORES_FILE = "cores.safetensors"
PLAN_FILE = "plan.json"
HEATMAP_FILE = "overlap.png"
CARD_SECTION_START = "<!-- dpi-hf:start -->"
CARD_SECTION_END = "<!-- dpi-hf:end -->"


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
    """Draw the Jaccard matrix of ``plan`` as a heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(plan.tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    im = ax.imshow(plan.jaccard, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), plan.tasks, rotation=45, ha="right")
    ax.set_yticks(range(n), plan.tasks)
    for i in range(n):
        for j in range(n):
            v = plan.jaccard[i][j]
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_title(f"Core overlap (Jaccard), τ = {plan.jaccard_threshold}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_record(plan: StagePlan, model=None, **settings) -> dict:
    """The JSON content of ``plan.json``: the plan plus settings, fingerprint and versions."""
    record = {**plan.to_dict(), **settings, "library_versions": library_versions()}
    if model is not None:
        record["model_fingerprint"] = model_fingerprint(model)["sha256"]
    return record


def save_dpi_artifacts(output_dir, cores, plan: StagePlan, model=None, **settings) -> Path:
    """Write ``dpi/cores.safetensors``, ``dpi/plan.json`` and ``dpi/overlap.png`` under ``output_dir``.

    Args:
        output_dir: the run's output directory.
        cores: task → CoreMask (may be None for plans that never probed).
        plan: the stage plan.
        model: the model the cores belong to (its fingerprint is stored).
        **settings: stored in plan.json and the cores metadata, e.g. core_fraction, core_scope, staging.
    """
    dpi_dir = Path(output_dir) / DPI_DIR
    if cores:
        save_cores(cores, dpi_dir / CORES_FILE, model=model, **settings)
    atomic_write_text(dpi_dir / PLAN_FILE, json.dumps(plan_record(plan, model, **settings), indent=2))
    if len(plan.tasks) > 1 and plan.jaccard:
        plot_overlap(plan, dpi_dir / HEATMAP_FILE)
    return dpi_dir


def find_dpi_dir(path) -> Path:
    """The ``dpi/`` folder of a run directory (or the folder itself)."""
    p = Path(path)
    for cand in (p / DPI_DIR, p):
        if (cand / CORES_FILE).is_file() or (cand / PLAN_FILE).is_file():
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


def load_dpi_artifacts(path, model=None, tasks=None):
    """Load ``(cores, plan)`` from a run directory, its ``dpi/`` folder, or a Hub repo id.

    Args:
        path: local directory or Hub repo id.
        model: if given, the cores' fingerprint is checked against it.
        tasks: tasks that must be present (a missing one is an error naming it).
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
        cores = load_cores(dpi_dir / CORES_FILE, model=model, tasks=tasks)
    plan = None
    if (dpi_dir / PLAN_FILE).is_file():
        plan = StagePlan.from_json((dpi_dir / PLAN_FILE).read_text())
        if cores is not None and all(t in cores for t in plan.tasks):
            plan.attach_cores(cores)
    return cores, plan


def card_section(plan: StagePlan, settings: dict) -> str:
    """Markdown section describing the DPI run, for the model card."""
    rows = [
        "| stage | tasks | frozen elements | frozen % |",
        "|---|---|---|---|",
    ]
    for k, stage in enumerate(plan.stages):
        cnt = plan.frozen_counts[k] if plan.frozen_counts else 0
        rows.append(f"| {k + 1} | {', '.join(stage)} | {cnt:,} | {100 * plan.frozen_fraction(k) if plan.frozen_counts else 0:.3f} |")
    lines = [
        CARD_SECTION_START,
        "## Dynamic Parameter Isolation (dpi-hf)",
        "",
        f"Trained with [dpi-hf](https://pypi.org/project/dpi-hf/) (staging `{settings.get('staging', 'dpi')}`, "
        f"core fraction p = {settings.get('core_fraction')}, Jaccard threshold τ = {plan.jaccard_threshold}, "
        f"scope `{settings.get('core_scope', 'global')}`). Each task's core region is the p share of parameter "
        "elements that moved most in a short probe fine-tune from the base weights; tasks with overlapping cores "
        "share a stage, and later stages keep earlier stages' cores frozen bit for bit.",
        "",
        *rows,
        "",
        f"Groups: {plan.groups}. Masks: `dpi/cores.safetensors`; plan: `dpi/plan.json`.",
    ]
    if len(plan.tasks) > 1 and plan.jaccard:
        lines += ["", f"![core overlap]({DPI_DIR}/{HEATMAP_FILE})"]
    lines.append(CARD_SECTION_END)
    return "\n".join(lines)


def write_model_card(output_dir, plan: StagePlan, settings: dict) -> Path:
    """Add (or replace) the DPI section and the ``dpi:`` metadata block in ``output_dir/README.md``."""
    from huggingface_hub import ModelCard

    path = Path(output_dir) / "README.md"
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\nlibrary_name: transformers\n---\n\n# {Path(output_dir).name}\n")
    card.data.dpi = {
        "tasks": plan.tasks,
        "stages": plan.stages,
        "jaccard_threshold": plan.jaccard_threshold,
        "frozen_counts": plan.frozen_counts,
        **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, type(None)))},
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
