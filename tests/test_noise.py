"""No noise on a CPU machine: the first line a `dpi-hf` command prints is its own, and the recipes use the current
transformers names (no deprecation warning caused by dpi-hf's own settings)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _first_line(*args: str) -> str:
    """The first line of a `dpi-hf` command's combined stdout and stderr, in a fresh process with the Hub offline
    (as the quickstart runs: importing TRL then makes bitsandbytes and `kernels` log at import time)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as a user has them (FutureWarnings are shown)
    done = subprocess.run([sys.executable, "-m", "dpi_hf.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    return (done.stdout.splitlines() or [""])[0]


def test_the_first_line_is_dpi_hfs_own(tmp_path):
    # --list-fields imports TRL (DPIConfig); the error line comes after every verb module was imported
    assert _first_line("train", "--list-fields").startswith("--")
    assert _first_line("plan", str(tmp_path / "missing")).startswith("dpi-hf: error: ")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipes_use_no_deprecated_training_argument(path):
    from dpi_hf.trainer.config import DPIConfig

    raw = yaml.safe_load(path.read_text())
    fields = {k: v for k, v in raw.items() if k in DPIConfig.__dataclass_fields__ and "${" not in str(v)}
    fields.update(output_dir="out", use_cpu=True, report_to="none")  # bf16 recipes validate on a CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DPIConfig(**fields)
    deprecated = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert deprecated == []
