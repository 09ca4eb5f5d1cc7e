"""LLM-as-judge scores (1–10) from an OpenAI-compatible chat-completions endpoint.

A judge failure is an error, never a score: after the retries a :class:`JudgeError` is raised. Without an
endpoint, report the offline proxy of :mod:`dpi_hf.evaluation.rouge` under its own name (``rougeL_proxy``).
"""

from __future__ import annotations

import json
import os
import http.client
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from dpi_hf.core.errors import DPIConfigError

# The single-answer grading prompt of MT-Bench (Zheng et al., 2023), the usual "GPT-4 score" protocol.
_SYSTEM = "You are a helpful assistant."
_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response.{reference_hint} "
    "Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your "
    "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
    "\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_REFERENCE_HINT = " You will be given a reference answer; use it to judge correctness, not wording."
# HTTP statuses worth retrying: timeouts, rate limits and server-side failures. Others (400, 401, 404, ...) mean
# the request itself is wrong, and repeating it cannot help.
_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_BRACKETED = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LABELLED = re.compile(r"rating\s*:\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*")


class JudgeError(RuntimeError):
    """The judge endpoint failed (errors, timeouts or unparsable replies) after all retries."""


class _Retryable(Exception):
    """One failed attempt that may succeed when repeated."""


def parse_judge_score(text: str) -> Optional[float]:
    """The 1–10 rating in a judge reply, or None.

    Accepted forms, in order: the last ``[[N]]``; the last ``Rating: N``; a reply that is only a number
    (optionally ``N/10``). A value outside 1–10 is not a rating.

    Args:
        text: the judge model's reply.
    """
    candidates = _BRACKETED.findall(text) or _LABELLED.findall(text)
    if candidates:
        value = float(candidates[-1])
    else:
        bare = _BARE.fullmatch(text)
        if bare is None:
            return None
        value = float(bare.group(1))
    return value if 1.0 <= value <= 10.0 else None


class JudgeClient:
    """A client for an OpenAI-compatible ``/v1/chat/completions`` endpoint that rates answers 1–10.

    Args:
        base_url: the API root, e.g. ``"https://api.openai.com/v1"`` or ``"http://127.0.0.1:8000"``; ``/v1`` is
            appended when missing, then ``/chat/completions``. A full ``.../chat/completions`` URL is used as is.
        model: the judge model name sent in the request (e.g. ``"gpt-4o"``).
        api_key_env: the environment variable holding the API key, sent as a Bearer token (default
            ``"OPENAI_API_KEY"``); when it is unset (or this is None) no Authorization header is sent, which
            suits local servers.
        timeout: seconds to wait for one HTTP response (default 60).
        max_retries: extra attempts after a failed one (default 3). Errors, timeouts and unparsable replies are
            retried; a 4xx status other than 408/409/425/429 fails at once.
        backoff: seconds before the first retry; doubled before each further one (default 1).
        max_tokens: the most tokens the judge may write (default 512: room for the explanation).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 512,
    ) -> None:
        if not base_url:
            raise DPIConfigError("base_url: empty; pass the judge's API root, e.g. 'http://127.0.0.1:8000/v1'")
        if timeout <= 0:
            raise DPIConfigError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise DPIConfigError(f"max_retries must be >= 0, got {max_retries}")
        url = base_url.rstrip("/")
        if not url.endswith("/chat/completions"):
            if not url.endswith("/v1"):
                url += "/v1"
            url += "/chat/completions"
        self.url = url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_tokens = max_tokens

    def score(self, question: str, answer: str, reference: Optional[str] = None) -> float:
        """Rate ``answer`` to ``question`` from 1 to 10.

        Args:
            question: the user's question.
            answer: the assistant's answer to rate.
            reference: a reference answer shown to the judge, or None (default) to judge without one.

        Raises:
            JudgeError: every attempt failed (the last error is in the message).
        """
        hint = _REFERENCE_HINT if reference is not None else ""
        user = _INSTRUCTION.format(reference_hint=hint) + f"[Question]\n{question}\n\n"
        if reference is not None:
            user += f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
        user += f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._post(messages)
            except _Retryable as exc:
                last_error = str(exc)
                continue
            value = parse_judge_score(reply)
            if value is not None:
                return value
            last_error = f"unparsable judge reply (no 1-10 rating): {reply[:200]!r}"
        raise JudgeError(f"judge {self.model!r} at {self.url} failed after {attempts} attempt(s): {last_error}")

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code} {exc.reason}"
            if exc.code in _RETRYABLE_STATUS:
                raise _Retryable(detail) from None
            raise JudgeError(f"judge {self.model!r} at {self.url} refused the request: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Retryable(f"response is not JSON: {exc}") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise _Retryable(f"response has no choices[0].message.content: {str(payload)[:200]}") from None


def judge_scores(
    client: JudgeClient,
    questions: list[str],
    answers: list[str],
    references: Optional[list[str]] = None,
    *,
    workers: int = 4,
) -> dict:
    """Mean judge rating of many answers.

    Args:
        client: the judge.
        questions: user questions.
        answers: the answers to rate, one per question.
        references: reference answers shown to the judge, or None (default) to judge without them.
        workers: concurrent requests (default 4).

    Returns:
        ``{"metric": "judge_score", "judge_score": mean 1–10, "n", "unparsable": 0 (an unparsable rating is an
        error, not a count), "empty_answers": answers with no text (still rated), "judge_model", "scores"}``.

    Raises:
        JudgeError: any rating failed after its retries (no partial or zero score is reported).
        DPIConfigError: lengths differ or there are no rows.
    """
    if len(questions) != len(answers) or (references is not None and len(references) != len(answers)):
        raise DPIConfigError("questions, answers and references must have the same length")
    if not answers:
        raise DPIConfigError("answers: empty; the judge needs at least one row")
    refs = references if references is not None else [None] * len(answers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scores = list(pool.map(client.score, questions, answers, refs))
    return {"metric": "judge_score", "judge_score": sum(scores) / len(scores), "n": len(scores), "unparsable": 0,
            "empty_answers": sum(not a.strip() for a in answers), "judge_model": client.model, "scores": scores}
