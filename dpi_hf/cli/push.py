"""``dpi-hf push OUTPUT_DIR REPO_ID``: upload a finished run to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import DPIConfigError
from .common import Verb

# Training artifacts that are not part of a published model: the per-phase runs (probe cores, progress, the full
# last-stage weights), Trainer checkpoints and per-stage models.
# (`_dpi_runs` is dpi_hf.trainer.RUNS_DIR, spelled out so that `dpi-hf push` does not import trl.)
PUSH_IGNORE = ["_dpi_runs/**", "checkpoint-*/**", "stage-*/**"]
# the stored importance (save_importance=True) is as large as the model in bf16 per task: left out unless asked
IMPORTANCE_IGNORE = "dpi/importance.safetensors"


def _arguments(push: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf push`` to its parser."""
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="a finished run's output_dir")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. my-name/smollm2-dpi")
    push.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    push.add_argument("--token", default=None,
                      help="Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`)")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.add_argument("--commit-message", default="Upload DPI model (dpi-hf)", help="the commit message")
    push.add_argument("--include-importance", action="store_true",
                      help=f"also upload {IMPORTANCE_IGNORE} (2 bytes per parameter per task; what protect_method="
                           "'ewc' and cores at other p read)")


def run(args, _extra) -> int:
    """``dpi-hf push``: upload the run to a Hub model repository with ``HfApi.upload_folder``."""
    from huggingface_hub import HfApi

    from ..artifacts import CORES_FILE, DPI_DIR, PLAN_FILE

    folder = Path(args.output_dir)
    if not folder.is_dir():
        raise DPIConfigError(f"OUTPUT_DIR {str(folder)!r} is not a directory; pass the output_dir of a finished run.")
    missing = [f for f in ("config.json", f"{DPI_DIR}/{PLAN_FILE}") if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise DPIConfigError(f"{str(folder)!r} is not a finished DPI run: it lacks {missing}; train it with "
                             "`dpi-hf train RECIPE` (which saves the model there) before pushing.")
    if not (folder / DPI_DIR / CORES_FILE).is_file():
        print(f"note: {folder / DPI_DIR / CORES_FILE} is absent (a baseline run without probes); pushing "
              "without cores.")
    api = HfApi(token=args.token)
    url = api.create_repo(repo_id=args.repo_id, private=args.private, exist_ok=True, repo_type="model")
    if args.revision:
        api.create_branch(repo_id=args.repo_id, branch=args.revision, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=args.repo_id, repo_type="model", revision=args.revision,
                      commit_message=args.commit_message,
                      ignore_patterns=PUSH_IGNORE + ([] if args.include_importance else [IMPORTANCE_IGNORE]))
    print(f"pushed {folder} to {url}")
    return 0


VERB = Verb(
    "push",
    help="upload a run's model, masks, plan and model card to the Hugging Face Hub",
    description="Upload OUTPUT_DIR (model, tokenizer, README.md model card, dpi/cores.safetensors, "
                "dpi/plan.json, plots, scores) to a Hub model repository, creating it if needed. Left out: "
                + ", ".join(PUSH_IGNORE) + f", and {IMPORTANCE_IGNORE} unless --include-importance.",
    arguments=_arguments, run=run, takes_overrides=False,
)
