"""Chat-template rendering shared by generation and likelihood scoring.

Prompts are rendered to text with the tokenizer's chat template and tokenised with ``add_special_tokens=False``:
templates that need a BOS token write it into the text themselves, so adding one again would duplicate it.
"""

from __future__ import annotations

from typing import Any

from dpi_hf.core.errors import DPIConfigError


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """Render ``messages`` with the chat template and the assistant generation prompt appended.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        messages: the chat messages (``{"role", "content"}`` dicts) to render.

    Raises:
        DPIConfigError: the tokenizer has no chat template.
    """
    return _apply(tokenizer, messages, add_generation_prompt=True)


def render_prompt_and_completion(tokenizer: Any, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
    """Split the rendered conversation ``prompt + completion`` into (prompt text, completion text).

    The prompt text is rendered with the generation prompt, so the completion text is exactly what the model
    is trained to produce after it (the assistant turn including its end-of-turn marker).

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        prompt: the prompt messages.
        completion: the completion messages (one assistant message).

    Raises:
        DPIConfigError: the template renders the prompt differently inside the full conversation, so the
            completion tokens cannot be isolated.
    """
    prompt_text = _apply(tokenizer, prompt, add_generation_prompt=True)
    full_text = _apply(tokenizer, list(prompt) + list(completion), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DPIConfigError(
            "tokenizer.chat_template: the rendered prompt is not a prefix of the rendered prompt+completion, so "
            "completion tokens cannot be isolated; use a template that renders earlier turns unchanged"
        )
    return prompt_text, full_text[len(prompt_text):]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (the chat template already wrote them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token (padding is masked out anyway).

    Raises:
        DPIConfigError: the tokenizer has neither.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DPIConfigError("tokenizer: it has neither a pad token nor an EOS token; set tokenizer.pad_token")


def _apply(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DPIConfigError(
            "tokenizer.chat_template is not set; evaluation renders prompts with the chat template, so load a "
            "chat/instruct tokenizer or assign tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
