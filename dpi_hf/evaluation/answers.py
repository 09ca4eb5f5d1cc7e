"""Finding the final answer in a completion, and regenerating reasoning-gym datasets: one rule and one cache.

Rules of :func:`extract_final_answer`, in order:

1. an ``<answer>...</answer>`` tag (reasoning-gym's own format): the content of the last one;
2. else the later of the last ``Answer:`` marker and the last ``####`` (GSM8K's marker): everything after it to
   the end of the text. ``Answer:`` may be written ``Final answer:``, in any case, with markdown emphasis
   (``**Answer:** 5``), and the answer may start on the next line or span several lines (grid answers do);
3. else None: there is no answer to find.

The answer is stripped of surrounding whitespace and markdown emphasis; an empty answer is None.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(r"(?:final[ \t]+)?answer[ \t*_]*:|####", re.IGNORECASE)


def extract_final_answer(text: str | None) -> str | None:
    """The final answer in ``text`` by the rules of the module docstring, or None when there is none.

    Args:
        text: a completion or a model's response (None or empty: None).
    """
    if not text:
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip() or None
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    answer = text[markers[-1].end():].strip().strip("*_").strip()
    return answer or None


@functools.lru_cache(maxsize=32)
def reasoning_gym_dataset(name: str, size: int, seed: int, kwargs_json: str = "{}") -> Any:
    """The reasoning-gym dataset ``name`` generated with ``size``, ``seed`` and the generator options, cached.

    Regenerating is deterministic but not free: every row of one task shares one dataset object.

    Args:
        name: the reasoning-gym dataset name, e.g. ``"chain_sum"``.
        size: how many entries were generated.
        seed: the generator's seed.
        kwargs_json: the generator's options as a JSON object with sorted keys (a hashable cache key; default
            ``"{}"``: none).
    """
    import reasoning_gym  # optional dependency (the "quickstart"/"eval" extras)

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(kwargs_json))
