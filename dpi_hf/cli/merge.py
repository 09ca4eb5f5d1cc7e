"""``dpi-hf merge A B OUTPUT_DIR --alpha X [--cores-from DIR --alpha-core Y]``: WiSE-FT weight interpolation."""

from __future__ import annotations

import argparse

from .common import Verb


def _arguments(merge: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dpi-hf merge`` to its parser."""
    merge.add_argument("a", metavar="A", help="checkpoint A (a saved model directory, safetensors)")
    merge.add_argument("b", metavar="B", help="checkpoint B of the same architecture, or a LoRA adapter directory")
    merge.add_argument("output_dir", metavar="OUTPUT_DIR", help="where the merged checkpoint goes (new or empty)")
    merge.add_argument("--alpha", type=float, required=True, help="the weight of B, in [0, 1] (0 = A, 1 = B)")
    merge.add_argument("--cores-from", default=None, metavar="DIR",
                       help="a run directory (or its dpi/) whose cores (all its tasks) get --alpha-core")
    merge.add_argument("--alpha-core", type=float, default=None, metavar="Y",
                       help="the weight of B on the cores' elements, in [0, 1] (with --cores-from)")


def run(args, _extra) -> int:
    """``dpi-hf merge``: see :func:`dpi_hf.merging.merge_checkpoints`."""
    from ..core.errors import DPIConfigError
    from ..merging import merge_checkpoints

    if (args.cores_from is None) != (args.alpha_core is None):  # named as the command line spells them
        raise DPIConfigError("--cores-from and --alpha-core go together: --alpha-core is the weight of B on the "
                             "cores' elements. Give both, or neither.")
    out = merge_checkpoints(args.a, args.b, args.output_dir, args.alpha, cores_from=args.cores_from,
                            alpha_core=args.alpha_core)
    print(f"[dpi-hf] merged {args.a} and {args.b} at alpha={args.alpha}"
          f"{f' (alpha_core={args.alpha_core} on the cores of {args.cores_from})' if args.cores_from else ''} "
          f"into {out}")
    return 0


VERB = Verb(
    "merge",
    help="interpolate the weights of two checkpoints of one model (WiSE-FT), optionally core-aware",
    usage="dpi-hf merge A B OUTPUT_DIR --alpha X [--cores-from DIR --alpha-core Y]",
    description="Write (1 − α) θ_A + α θ_B into OUTPUT_DIR, streaming tensor by tensor (two checkpoints larger "
                "than memory work), with A's dtypes, sharding, config and tokenizer, and a model card with "
                "base_model and base_model_relation: merge. B may be a PEFT LoRA adapter directory trained on "
                "A. With --cores-from, the cores' elements get --alpha-core instead (after checking that the "
                "cores were probed on A's weights).",
    arguments=_arguments, run=run, takes_overrides=False,
)
