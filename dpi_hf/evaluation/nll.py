"""Held-out loss: mean negative log-likelihood per token of the reference completions."""

from __future__ import annotations

import math
from typing import Any

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.chat import encode, pad_token_id, render_prompt_and_completion
from dpi_hf.evaluation.rows import column
from dpi_hf.evaluation.scoring import continuation_logprobs


def heldout_nll(model: Any, tokenizer: Any, dataset: Any, *, batch_size: int = 8) -> dict:
    """Mean NLL per token of each row's reference ``completion`` given its ``prompt``.

    The conversation is rendered with the chat template; only the completion's tokens count (the assistant turn
    after the generation prompt, including its end-of-turn marker, as in completion-only SFT loss). The mean is
    token-weighted over the whole dataset: total NLL / total completion tokens.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, with a chat template.
        dataset: rows with ``prompt`` and ``completion`` columns.
        batch_size: sequences per forward pass (default 8).

    Returns:
        ``{"metric": "nll", "nll": mean NLL per token (nats), "perplexity": exp(nll), "n": rows, "tokens":
        completion tokens scored, "unparsable": 0}``.

    Raises:
        DPIConfigError: an empty dataset, a missing column, or a template that prevents isolating the completion.
    """
    prompts, completions = column(dataset, "prompt"), column(dataset, "completion")
    if not prompts:
        raise DPIConfigError("dataset: it is empty; held-out NLL needs at least one row")
    pairs = []
    for prompt, completion in zip(prompts, completions):
        prompt_text, completion_text = render_prompt_and_completion(tokenizer, prompt, completion)
        pairs.append((encode(tokenizer, prompt_text), encode(tokenizer, completion_text)))
    scored = continuation_logprobs(model, pairs, pad_token_id=pad_token_id(tokenizer), batch_size=batch_size)
    total_logprob = sum(logprob for logprob, _ in scored)
    tokens = sum(count for _, count in scored)
    nll = -total_logprob / tokens
    return {"metric": "nll", "nll": nll, "perplexity": math.exp(nll), "n": len(pairs), "tokens": tokens,
            "unparsable": 0}
