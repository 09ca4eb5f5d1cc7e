"""Greedy batched generation from chat prompts."""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.chat import encode, pad_token_id, render_prompt
from dpi_hf.evaluation.scoring import inference_batches, padded_batch


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> list[str]:
    """Greedily generate one assistant reply per chat prompt.

    Each prompt is rendered with the chat template (generation prompt appended), batches are LEFT-padded so every
    row's last prompt token sits at the same position, the KV cache is used, and only the new tokens are decoded
    (special tokens dropped, surrounding whitespace stripped). Prompts are batched in order of length so that rows
    of similar length share a batch (less padding); the result is returned in the input order. The tokenizer is
    not modified: without a pad token the EOS id pads (padding is masked by the attention mask). The model's
    train/eval mode is restored afterwards.

    Args:
        model: a causal LM (``generate`` API).
        tokenizer: its tokenizer, with a chat template.
        prompts: chat prompts, each a list of ``{"role", "content"}`` messages.
        max_new_tokens: the most tokens generated per prompt (default 256).
        batch_size: prompts per ``generate`` call (default 8).

    Returns:
        The decoded completions, one per prompt, in the order of ``prompts``.

    Raises:
        DPIConfigError: ``max_new_tokens`` or ``batch_size`` is not positive, or the tokenizer lacks a chat
            template / pad and EOS tokens.
    """
    if max_new_tokens < 1:
        raise DPIConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise DPIConfigError(f"batch_size must be >= 1, got {batch_size}")
    pad = pad_token_id(tokenizer)
    encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=_eos_ids(model, tokenizer) or None,
    )
    outputs: list[str] = [""] * len(encoded)
    for batch in inference_batches(model, [len(e) for e in encoded], batch_size):
        input_ids, attention_mask = padded_batch([encoded[i] for i in batch], pad, side="left")
        width = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            generation_config=config,
        )
        for row, i in enumerate(batch):
            new_tokens = generated[row, width:]
            outputs[i] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return outputs


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Stop tokens: the model's generation-config EOS ids plus the tokenizer's EOS (chat models often end a turn
    with a token, such as ``<|im_end|>``, that only one of the two names)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.extend([configured] if isinstance(configured, int) else list(configured))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))
