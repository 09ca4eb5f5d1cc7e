"""Log-likelihood of token continuations given contexts, batched (used by held-out NLL and LogiQA)."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from dpi_hf.core.errors import DPIConfigError


def padded_batch(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> tuple:
    """``(input_ids, attention_mask)`` of token-id lists padded to one width with TRL's ``pad``.

    Args:
        sequences: token ids, one list per row (each non-empty).
        pad_token_id: the id padding positions get (masked by the attention mask).
        side: ``"right"`` (default; scoring) or ``"left"`` (generation: every row's last token at the same
            position).
    """
    from trl.trainer.utils import pad

    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    return (pad(rows, padding_value=pad_token_id, padding_side=side),
            pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side=side))


def inference_batches(model: Any, lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of ``batch_size``, longest rows first (rows of similar length share a batch: less
    padding), with ``model`` in eval mode under ``torch.inference_mode()`` while the caller handles each batch; the
    model's train/eval mode is restored afterwards.

    Args:
        model: the model the caller runs on each batch.
        lengths: each row's length in tokens.
        batch_size: rows per batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                yield order[start:start + batch_size]
    finally:
        model.train(was_training)


def continuation_logprobs(
    model: Any,
    pairs: list[tuple[list[int], list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each continuation's tokens given its context.

    Each pair is (context ids, continuation ids), tokenised separately and concatenated, so the continuation's
    tokens are exactly the ones scored. Sequences are right-padded (padding masked) and batched in order of length;
    log-softmax is taken in float32 over the continuation positions only, so the full-vocabulary log-probabilities
    of the context are never materialised. The model's train/eval mode is restored afterwards.

    Args:
        model: a causal LM returning ``.logits``.
        pairs: (context ids, continuation ids); each context needs at least one token and each continuation at
            least one token.
        pad_token_id: the id used for padding.
        batch_size: sequences per forward pass (default 8).

    Returns:
        (sum of log-probabilities, number of continuation tokens) per pair, in the order of ``pairs``.

    Raises:
        DPIConfigError: an empty context or continuation, or a non-positive ``batch_size``.
    """
    if batch_size < 1:
        raise DPIConfigError(f"batch_size must be >= 1, got {batch_size}")
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise DPIConfigError(
                f"pair {i}: the context and the continuation each need at least one token "
                f"(got {len(context)} and {len(continuation)})"
            )
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for batch in inference_batches(model, [len(c) + len(t) for c, t in pairs], batch_size):
        sequences = [pairs[i][0] + pairs[i][1] for i in batch]
        input_ids, attention_mask = padded_batch(sequences, pad_token_id, side="right")
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        for row, i in enumerate(batch):
            context, continuation = pairs[i]
            # logits at position t predict token t + 1
            first, last = len(context) - 1, len(context) + len(continuation) - 1
            logprobs = torch.log_softmax(logits[row, first:last].float(), dim=-1)
            targets = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
            total = logprobs.gather(-1, targets[:, None]).sum().item()
            results[i] = (total, len(continuation))
    return results
