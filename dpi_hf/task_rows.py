"""The row every task loader builds (see :mod:`dpi_hf.data`): TRL's conversational prompt-completion format plus the
``task``, ``reference`` and ``meta`` columns, and the small helpers the loaders of :mod:`dpi_hf.data` and
:mod:`dpi_hf.reasoning_gym_tasks` share."""

from __future__ import annotations

import json
import re

from .core.errors import DPIConfigError

__all__ = ["ANSWER_INSTRUCTION", "make_row", "messages", "record_error", "drop_hash_line", "json_roundtrips"]

# Appended to reasoning-gym questions (and LogiQA) so that a model's answer can be found by extract_final_answer.
ANSWER_INSTRUCTION = 'End your response with the final answer on its own line, in the form "Answer: <answer>".'


def make_row(spec, prompt, completion, reference: str, meta: dict) -> dict:
    """Assemble a row of task ``spec`` (a :class:`~dpi_hf.data.TaskSpec`: its ``name`` and ``system_prompt``);
    ``prompt``/``completion`` are a string or a list of messages, ``meta`` a JSON-able dict."""
    prompt = messages(prompt, "user")
    if spec.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": spec.system_prompt}] + prompt
    return {"prompt": prompt, "completion": messages(completion, "assistant"), "task": spec.name,
            "reference": str(reference), "meta": json.dumps(meta)}


def messages(value, role: str) -> list[dict]:
    """A string becomes one ``role`` message; message lists are kept with only ``role`` and ``content``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def record_error(spec, index: int, problem: str) -> DPIConfigError:
    """The error for record ``index`` of task ``spec``'s data: ``problem`` says what is wrong with it."""
    return DPIConfigError(f"task {spec.name!r}: record {index} of {spec.path!r} {problem}.")


def drop_hash_line(text: str) -> str:
    """``text`` without a trailing GSM8K ``#### <answer>`` line."""
    return re.sub(r"\n?[ \t]*####[^\n]*\s*$", "", text.rstrip())


def json_roundtrips(value) -> bool:
    """True when ``value`` survives JSON unchanged (tuples, sets or objects inside do not)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False
