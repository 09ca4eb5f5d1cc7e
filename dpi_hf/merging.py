"""WiSE-FT weight interpolation of two models or two checkpoint directories of one architecture.

* :func:`merge_models` — ``(1 − α) θ_A + α θ_B`` of two models in memory, as a new model (the inputs are unchanged);
  with ``cores`` and ``alpha_core``, ``α_core`` on the cores' elements (a core-aware interpolation).
* :func:`merge_checkpoints` — the same on two saved checkpoints (``dpi-hf merge``), streamed: one tensor of each at
  a time and one output shard in memory, so two 7B checkpoints need not fit in memory at once. A's sharding (its
  ``model.safetensors.index.json``), dtypes, config and tokenizer files are kept; B may be a PEFT LoRA adapter
  directory, merged into A's weights tensor by tensor (θ_B = θ_A + scale · B@A on the adapted layers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .core.copying import independent_copy
from .core.errors import DPIConfigError, FingerprintMismatchError
from .core.interpolation import check_same_architecture, interpolate, lora_delta, validate_alpha
from .core.masks import CoreMask
from .offline import MARKER_FILE, hub_model_id

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# files of a checkpoint directory that are weights or the card, not copied from A (the rest — config, generation
# config, tokenizer files, chat template — is)
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def _check_alphas(alpha, cores, alpha_core, cores_name: str = "cores") -> tuple[float, float | None]:
    alpha = validate_alpha(alpha, "alpha")
    if (cores is None) != (alpha_core is None):
        raise DPIConfigError(
            f"{cores_name} and alpha_core go together: alpha_core is the weight of B on the cores' elements. Give "
            "both, or neither."
        )
    return alpha, (validate_alpha(alpha_core, "alpha_core") if alpha_core is not None else None)


def merge_models(model_a: torch.nn.Module, model_b: torch.nn.Module, alpha: float, *, cores: CoreMask | None = None,
                 alpha_core: float | None = None) -> torch.nn.Module:
    """A new model with weights ``(1 − α) θ_A + α θ_B`` (WiSE-FT); ``model_a`` and ``model_b`` are unchanged.

    Every floating tensor of the state dict (parameters and buffers) is interpolated in float32 and cast back to A's
    dtype; α = 0 gives A's weights and α = 1 B's, bit for bit.

    Args:
        model_a: the first model (e.g. the model before fine-tuning); the result is a copy of it
            (:func:`~dpi_hf.core.copying.independent_copy`).
        model_b: the second model, of the same architecture (same parameter names and shapes).
        alpha: the weight α of B, in [0, 1].
        cores: a :class:`~dpi_hf.core.CoreMask` over A's parameters; its elements get ``alpha_core`` instead of
            ``alpha`` (default None).
        alpha_core: the weight of B on the elements of ``cores``, in [0, 1] (default None; required with ``cores``).
            E.g. ``alpha=1, alpha_core=0`` takes B's weights except on A's core.

    Raises:
        DPIConfigError: α or α_core outside [0, 1], ``cores`` without ``alpha_core`` (or the reverse), models of
            different architectures, or cores over other parameters.
    """
    alpha, alpha_core = _check_alphas(alpha, cores, alpha_core)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture({n: tuple(t.shape) for n, t in state_a.items()},
                            {n: tuple(t.shape) for n, t in state_b.items()}, ("model_a", "model_b"))
    if cores is not None:
        _check_cores_fit(cores, {n: tuple(t.shape) for n, t in state_a.items()})
    merged = independent_copy(model_a)  # not deepcopy: a trained model's forward may be bound to the original
    with torch.no_grad():
        targets = dict(merged.named_parameters()) | dict(merged.named_buffers())
        for name, target in targets.items():
            if name not in state_a:  # a non-persistent buffer: not part of the checkpoint, kept from A
                continue
            idx = cores.indices(name) if cores is not None and name in cores else None
            target.copy_(interpolate(state_a[name], state_b[name], alpha, idx, alpha_core))
    return merged


def _check_cores_fit(cores: CoreMask, shapes: dict) -> None:
    for n in cores.names():
        if n not in shapes:
            raise DPIConfigError(f"cores name parameter {n!r}, which model A does not have: they belong to another "
                                 "model.")
        if tuple(cores.shape(n)) != tuple(shapes[n]):
            raise DPIConfigError(f"cores hold {n!r} with shape {cores.shape(n)}, model A has {tuple(shapes[n])}: "
                                 "they belong to another model.")


# ---------------------------------------------------------------------------------------------------- checkpoints
class Checkpoint:
    """The safetensors weights of a checkpoint directory, read one tensor at a time (single file or sharded)."""

    def __init__(self, directory, role: str):
        from safetensors import safe_open

        self.dir = Path(directory)
        self.role = role
        if not self.dir.is_dir():
            raise DPIConfigError(f"{role} {str(self.dir)!r} is not a directory; pass a saved model's directory "
                                 "(model.save_pretrained / a run's output_dir).")
        if (self.dir / SAFE_INDEX).is_file():
            self.index = json.loads((self.dir / SAFE_INDEX).read_text())
            weight_map = dict(self.index["weight_map"])
        elif (self.dir / SAFE_WEIGHTS).is_file():
            self.index = None
            with safe_open(str(self.dir / SAFE_WEIGHTS), framework="pt") as f:
                weight_map = {k: SAFE_WEIGHTS for k in f.keys()}
        else:
            raise DPIConfigError(
                f"{role} {str(self.dir)!r} holds no {SAFE_WEIGHTS} or {SAFE_INDEX}; save it with "
                "save_pretrained(safe_serialization=True) (pytorch_model.bin is not read)."
            )
        self.weight_map = weight_map
        self._handles = {}

    def _file(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), framework="pt")
        return self._handles[fname]

    def shapes(self) -> dict[str, tuple]:
        """Tensor name → shape, read from the headers (no tensor is loaded)."""
        return {n: tuple(self._file(n).get_slice(n).get_shape()) for n in self.weight_map}

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def files(self) -> dict[str, list[str]]:
        """Shard file → its tensor names, in A's order."""
        out: dict[str, list[str]] = {}
        for n, f in self.weight_map.items():
            out.setdefault(f, []).append(n)
        return out

    def __iter__(self):
        # (name, tensor) pairs one at a time: a re-iterable source for the cores' fingerprint check
        for n in self.weight_map:
            yield n, self.tensor(n)


class _OrderedTensors:
    """The tensors of a checkpoint in a given name order (the order a model fingerprint lists its parameters), read
    lazily; re-iterable, for :func:`~dpi_hf.core.check_fingerprint` without loading the checkpoint."""

    def __init__(self, checkpoint: Checkpoint, names: list[str]):
        self.checkpoint, self.names = checkpoint, names

    def __iter__(self):
        for n in self.names:
            if n in self.checkpoint.weight_map:
                yield n, self.checkpoint.tensor(n)


class LoraAdapter:
    """A PEFT LoRA adapter directory as weight deltas of its base model's tensors, computed one at a time."""

    def __init__(self, directory):
        from peft import PeftConfig
        from safetensors.torch import load_file

        self.dir = Path(directory)
        config = PeftConfig.from_pretrained(str(self.dir))
        peft_type = str(getattr(config, "peft_type", ""))
        problems = []
        if "LORA" not in peft_type.upper():
            problems.append(f"peft_type {peft_type}")
        if getattr(config, "use_dora", False):
            problems.append("use_dora=True")
        if getattr(config, "bias", "none") != "none":
            problems.append(f"bias={config.bias!r}")
        if getattr(config, "modules_to_save", None):
            problems.append(f"modules_to_save={config.modules_to_save}")
        if problems:
            raise DPIConfigError(
                f"B {str(self.dir)!r} is a PEFT adapter dpi-hf cannot merge tensor by tensor ({', '.join(problems)}); "
                "merge it with peft (model.merge_and_unload(), then save_pretrained) and pass that directory as B."
            )
        if not (self.dir / ADAPTER_WEIGHTS).is_file():
            raise DPIConfigError(f"B {str(self.dir)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}.")
        self.config = config
        state = load_file(str(self.dir / ADAPTER_WEIGHTS))  # adapters are small: read whole
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for key, lora_a in state.items():
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise DPIConfigError(f"B {str(self.dir)!r} holds {key!r}, which is not a LoRA A/B weight of a "
                                         "linear layer; merge it with peft's merge_and_unload() instead.")
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            lora_b = state.get(key.replace(".lora_A.", ".lora_B."))
            if lora_b is None:
                raise DPIConfigError(f"B {str(self.dir)!r} has {key!r} without its lora_B; the adapter is corrupt.")
            self.layers[f"{module}.weight"] = (lora_a, lora_b, self._scale(module, lora_a.shape[0]))

    def _scale(self, module: str, rank: int) -> float:
        from peft.utils.other import get_pattern_key

        c = self.config
        alpha = c.alpha_pattern.get(get_pattern_key(c.alpha_pattern.keys(), module), c.lora_alpha) \
            if c.alpha_pattern else c.lora_alpha
        return alpha / rank ** 0.5 if c.use_rslora else alpha / rank

    def check_fits(self, shapes: dict) -> None:
        for name, (lora_a, lora_b, _) in self.layers.items():
            expected = (lora_b.shape[0], lora_a.shape[1])
            if getattr(self.config, "fan_in_fan_out", False):
                expected = expected[::-1]
            if name not in shapes or tuple(shapes[name]) != tuple(expected):
                raise DPIConfigError(
                    f"checkpoints A and B have different architectures: the adapter B changes {name!r} with shape "
                    f"{tuple(expected)}, which A {'has as ' + str(tuple(shapes[name])) if name in shapes else 'lacks'}."
                    " Pass the adapter's own base model as A."
                )

    def weights_of(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """θ_B of tensor ``name``: A's tensor plus the adapter's delta (float32), or A's tensor where not adapted."""
        if name not in self.layers:
            return a
        lora_a, lora_b, scale = self.layers[name]
        return a.to(torch.float32) + lora_delta(lora_a, lora_b, scale, getattr(self.config, "fan_in_fan_out", False))


def load_cores_for_checkpoint(cores_from, checkpoint: Checkpoint) -> tuple[CoreMask, dict]:
    """The union of the cores of ``cores_from`` (a run directory or its ``dpi/``), after checking their fingerprint
    (names, shapes and the weights' content digest) against checkpoint A, read one tensor at a time."""
    from .artifacts import CORES_FILE, resolve_masks_source
    from .core import load_cores, read_cores_metadata
    from .core.errors import MaskFileError

    if not Path(str(cores_from)).exists():
        raise DPIConfigError(f"--cores-from {str(cores_from)!r} does not exist; pass the output_dir of a DPI run or "
                             "probe_cores.")
    try:
        dpi_dir = resolve_masks_source(str(cores_from))
    except MaskFileError as e:
        raise DPIConfigError(str(e)) from None
    if not (dpi_dir / CORES_FILE).is_file():
        raise DPIConfigError(f"--cores-from {str(cores_from)!r} holds no {CORES_FILE}; probe the cores first.")
    meta = read_cores_metadata(dpi_dir / CORES_FILE)
    source = _OrderedTensors(checkpoint, list(meta["fingerprint"]["parameters"]))
    try:
        cores = load_cores(dpi_dir / CORES_FILE, model=source, check_content=True)
    except FingerprintMismatchError as e:
        raise DPIConfigError(f"--cores-from {str(cores_from)!r} does not belong to checkpoint A: {e}") from None
    union = CoreMask.union_all(cores.values())
    return union, {"source": str(cores_from), "tasks": list(cores), "elements": union.count()}


def merge_checkpoints(a_dir, b_dir, output_dir, alpha: float, *, cores_from=None, alpha_core: float | None = None,
                      log=print) -> Path:
    """Interpolate two checkpoint directories into ``output_dir``: ``(1 − α) θ_A + α θ_B`` tensor by tensor.

    Everything is checked before anything is written: α and α_core in [0, 1], the two architectures (tensor names
    and shapes), the cores' fingerprint against A, and an empty ``output_dir``.

    Args:
        a_dir: checkpoint A (``save_pretrained`` output, safetensors, one file or sharded with an index json); its
            sharding, dtypes, config and tokenizer files are kept.
        b_dir: checkpoint B of the same architecture, or a PEFT LoRA adapter directory trained on A (then θ_B =
            θ_A + scale · B@A on the adapted layers, with peft's scale lora_alpha / r, or / √r with rsLoRA).
        output_dir: where the merged checkpoint goes; must not exist or be empty.
        alpha: the weight of B, in [0, 1].
        cores_from: a run directory (or its ``dpi/``) whose cores (the union of all its tasks) get ``alpha_core``;
            their fingerprint must match A's names, shapes and weights. Default None.
        alpha_core: the weight of B on the cores' elements, in [0, 1] (required with ``cores_from``).
        log: where progress lines go (default print).

    Returns:
        ``output_dir``.
    """
    alpha, alpha_core = _check_alphas(alpha, cores_from, alpha_core, "cores_from")
    ckpt_a = Checkpoint(a_dir, "A")
    shapes_a = ckpt_a.shapes()
    b_path = Path(b_dir)
    if (b_path / ADAPTER_CONFIG).is_file():
        adapter, ckpt_b = LoraAdapter(b_path), None
        adapter.check_fits(shapes_a)
    else:
        adapter, ckpt_b = None, Checkpoint(b_dir, "B")
        check_same_architecture(shapes_a, ckpt_b.shapes())
    cores, cores_record = (load_cores_for_checkpoint(cores_from, ckpt_a) if cores_from is not None else (None, None))
    out = Path(output_dir)
    if out.resolve() in (Path(a_dir).resolve(), b_path.resolve()):
        raise DPIConfigError("OUTPUT_DIR is one of the inputs; write the merge to a new directory.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DPIConfigError(f"OUTPUT_DIR {str(out)!r} exists and is not empty; pick a new directory.")

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    total_size = 0
    for fname, names in ckpt_a.files().items():
        shard = {}
        for name in names:
            a = ckpt_a.tensor(name)
            b = adapter.weights_of(name, a) if adapter is not None else ckpt_b.tensor(name)
            idx = cores.indices(name) if cores is not None and name in cores else None
            shard[name] = interpolate(a, b, alpha, idx, alpha_core).contiguous()
            total_size += shard[name].numel() * shard[name].element_size()
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        log(f"[dpi-hf] merge: wrote {fname} ({len(names)} tensors)")
        del shard
    if ckpt_a.index is not None:
        index = dict(ckpt_a.index)
        index["metadata"] = {**index.get("metadata", {}), "total_size": total_size}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    for f in sorted(Path(a_dir).iterdir()):  # config, generation config, tokenizer, chat template
        # not the offline-conversion marker: the merge is not the converted model (its card would name that one)
        if f.is_file() and not f.name.endswith(_NOT_COPIED) and f.name not in (SAFE_INDEX, "README.md", MARKER_FILE):
            shutil.copy2(f, out / f.name)
    write_merge_card(out, a_dir, b_dir, alpha, adapter is not None, cores_record, alpha_core)
    return out


def write_merge_card(output_dir: Path, a_dir, b_dir, alpha: float, b_is_adapter: bool, cores: dict | None,
                     alpha_core: float | None) -> Path:
    """``README.md`` of a merged checkpoint: ``base_model`` (the Hub ids of A and B, where they have one) with
    ``base_model_relation: merge``, and the weights."""
    from huggingface_hub import ModelCard, ModelCardData

    def hub_id(path) -> str | None:
        # a converted offline checkpoint names its Hub model; else the config's _name_or_path, if it is a Hub id
        # (a local path never is: the Hub's model tree would point nowhere)
        found = hub_model_id(path)
        config = Path(path) / "config.json"
        if found is None and config.is_file():
            found = hub_model_id(json.loads(config.read_text()).get("_name_or_path"))
        return found

    bases = [hub_id(a_dir)] + ([] if b_is_adapter else [hub_id(b_dir)])
    bases = list(dict.fromkeys(b for b in bases if b))
    data = ModelCardData(library_name="transformers", tags=["merge", "wise-ft", "dpi-hf"])
    if bases:
        data.base_model = bases if len(bases) > 1 else bases[0]
        data.base_model_relation = "merge"
    data.dpi_merge = {"alpha": alpha, "a": str(a_dir), "b": str(b_dir), "b_is_lora_adapter": b_is_adapter,
                      **({"alpha_core": alpha_core, "cores": cores} if cores else {})}
    core_line = (f" On the {cores['elements']:,} elements of the cores of {', '.join(cores['tasks'])} (from "
                 f"`{cores['source']}`), the weight of B is α_core = {alpha_core}.") if cores else ""
    text = (f"---\n{data.to_yaml()}\n---\n\n# {Path(output_dir).name}\n\n"
            f"A weight interpolation (WiSE-FT) made with dpi-hf `merge`: "
            f"θ = (1 − α) θ_A + α θ_B with α = {alpha}, A = `{a_dir}`, B = `{b_dir}`"
            f"{' (a LoRA adapter merged into A: θ_B = θ_A + scale · B@A)' if b_is_adapter else ''}.{core_line}\n")
    path = Path(output_dir) / "README.md"
    ModelCard(text).save(path)
    return path
