"""WiSE-FT interpolation: merge_models in memory, merge_checkpoints / `dpi-hf merge` on saved checkpoints."""

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from dpi_hf import CoreMask, DPIConfigError, merge_models, save_cores
from dpi_hf.cli import main as cli_main
from dpi_hf.merging import merge_checkpoints


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _pair(tokenizer):
    return tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)


def _saved_weights(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _some_core(model):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return CoreMask.from_indices({"model.layers.0.mlp.up_proj.weight": torch.arange(0, 200, 3),
                                  "lm_head.weight": torch.tensor([1, 2, 40])}, shapes)


def test_merge_models_ends_and_middle(tokenizer):
    a, b = _pair(tokenizer)
    before_a, before_b = _state(a), _state(b)
    for alpha, want in ((0.0, before_a), (1.0, before_b)):
        merged = merge_models(a, b, alpha)
        assert merged is not a and merged is not b
        for n, t in merged.state_dict().items():
            assert torch.equal(t, want[n]), (alpha, n)
    half = merge_models(a, b, 0.25).state_dict()
    for n in half:
        torch.testing.assert_close(half[n], 0.75 * before_a[n] + 0.25 * before_b[n])
    for n, t in a.state_dict().items():  # the inputs are unchanged
        assert torch.equal(t, before_a[n])
    for n, t in b.state_dict().items():
        assert torch.equal(t, before_b[n])


def test_merge_models_core_aware(tokenizer):
    a, b = _pair(tokenizer)
    core = _some_core(a)
    merged = merge_models(a, b, 1.0, cores=core, alpha_core=0.0).state_dict()
    for n, t in merged.items():
        if n in core and core.count(n):
            idx = core.indices(n)
            assert torch.equal(t.flatten()[idx], a.state_dict()[n].flatten()[idx])  # A's core kept
            rest = torch.ones(t.numel(), dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(t.flatten()[rest], b.state_dict()[n].flatten()[rest])
        else:
            assert torch.equal(t, b.state_dict()[n]), n


def test_merge_models_bad_input(tokenizer):
    a, b = _pair(tokenizer)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(DPIConfigError, match=r"alpha=.*\[0, 1\]"):
            merge_models(a, b, bad)
    with pytest.raises(DPIConfigError, match=r"alpha_core=.*\[0, 1\]"):
        merge_models(a, b, 0.5, cores=_some_core(a), alpha_core=2.0)
    with pytest.raises(DPIConfigError, match="go together"):
        merge_models(a, b, 0.5, cores=_some_core(a))
    other = tiny_llama(tokenizer, hidden=16, intermediate=32)
    with pytest.raises(DPIConfigError, match="different architectures"):
        merge_models(a, other, 0.5)
    with pytest.raises(DPIConfigError, match="different architectures"):
        merge_models(a, tiny_llama(tokenizer, layers=3), 0.5)


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_checkpoints_ends_exact_python_and_cli(tmp_path, tokenizer, capsys, sharded):
    a, b = _pair(tokenizer)
    kw = {"max_shard_size": "60KB"} if sharded else {}
    a.to(torch.bfloat16).save_pretrained(tmp_path / "A", **kw)  # bf16 A, fp32 B: A's dtype is kept
    tokenizer.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B", **kw)
    wa, wb = _saved_weights(tmp_path / "A"), _saved_weights(tmp_path / "B")
    assert (tmp_path / "A" / "model.safetensors.index.json").is_file() == sharded
    merge_checkpoints(tmp_path / "A", tmp_path / "B", tmp_path / "m0", 0.0, log=lambda _: None)
    assert cli_main(["merge", str(tmp_path / "A"), str(tmp_path / "B"), str(tmp_path / "m1"), "--alpha", "1"]) == 0
    w0, w1 = _saved_weights(tmp_path / "m0"), _saved_weights(tmp_path / "m1")
    assert set(w0) == set(wa) == set(w1)
    for n in wa:
        assert w0[n].dtype == torch.bfloat16 and torch.equal(w0[n], wa[n]), n
        assert torch.equal(w1[n], wb[n].to(torch.bfloat16)), n
    for out in ("m0", "m1"):
        d = tmp_path / out
        assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
        assert (d / "model.safetensors.index.json").is_file() == sharded
        card = (d / "README.md").read_text()
        # A and B are local directories with no Hub id: no base_model (a local path is never one)
        assert "base_model" not in card and "wise-ft" in card
        assert "pypi.org" not in card  # dpi-hf has no package page to link to
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m0")
    for n, t in reloaded.state_dict().items():
        assert torch.equal(t, a.state_dict()[n].to(torch.bfloat16)), n


def test_merge_checkpoints_with_cores(tmp_path, tokenizer):
    a, b = _pair(tokenizer)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    core = _some_core(a)
    save_cores({"old": core}, tmp_path / "cores" / "dpi" / "cores.safetensors", model=a)
    assert cli_main(["merge", str(tmp_path / "A"), str(tmp_path / "B"), str(tmp_path / "m"), "--alpha", "0.5",
                     "--cores-from", str(tmp_path / "cores"), "--alpha-core", "0"]) == 0
    got = _saved_weights(tmp_path / "m")
    want = merge_models(a, b, 0.5, cores=core, alpha_core=0.0).state_dict()
    for n, t in got.items():
        assert torch.equal(t, want[n]), n
    meta = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "m" / "README.md").read_text()
                                                              .split("---")[1])))
    assert meta["dpi_merge"]["alpha_core"] == 0.0 and meta["dpi_merge"]["cores"]["tasks"] == ["old"]
    # cores probed on other weights (B's) are refused before anything is written
    save_cores({"old": core}, tmp_path / "bcores" / "dpi" / "cores.safetensors", model=b)
    with pytest.raises(DPIConfigError, match="does not belong to checkpoint A"):
        merge_checkpoints(tmp_path / "A", tmp_path / "B", tmp_path / "m2", 0.5, cores_from=tmp_path / "bcores",
                          alpha_core=0.0)
    assert not (tmp_path / "m2").exists()


def test_merge_checkpoints_bad_input(tmp_path, tokenizer, capsys):
    a, b = _pair(tokenizer)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    tiny_llama(tokenizer, layers=3).save_pretrained(tmp_path / "C")
    cases = [
        (["--alpha", "1.2"], r"alpha=1.2 must be a number in \[0, 1\]"),
        (["--alpha", "0.5", "--alpha-core", "-1", "--cores-from", str(tmp_path / "A")], r"alpha_core=-1.0"),
        (["--alpha", "0.5", "--alpha-core", "0.5"], "--cores-from and --alpha-core go together"),  # CLI spelling
    ]
    for extra, message in cases:
        assert cli_main(["merge", str(tmp_path / "A"), str(tmp_path / "B"), str(tmp_path / "out"), *extra]) == 2
        assert __import__("re").search(message, capsys.readouterr().err)
    assert cli_main(["merge", str(tmp_path / "A"), str(tmp_path / "C"), str(tmp_path / "out"), "--alpha", "0.5"]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "A"), str(tmp_path / "nope"), str(tmp_path / "out"), "--alpha", "0.5"]) \
        == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written by any failed merge
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(DPIConfigError, match="not empty"):
        merge_checkpoints(tmp_path / "A", tmp_path / "B", tmp_path / "busy", 0.5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_merge_equals_peft(tmp_path, tokenizer, rslora):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tokenizer)
    base.save_pretrained(tmp_path / "A")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        alpha_pattern={"down_proj": 2} if not rslora else {})
    peft_model = get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # LoRA's B starts at 0: give the adapter an effect
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_checkpoints(tmp_path / "A", tmp_path / "adapter", tmp_path / "m", 1.0, log=lambda _: None)
    expected = peft_model.merge_and_unload().state_dict()
    got = _saved_weights(tmp_path / "m")
    changed = 0
    for n, t in got.items():
        torch.testing.assert_close(t, expected[n], rtol=1e-6, atol=1e-7)
        changed += int(not torch.equal(t, _saved_weights(tmp_path / "A")[n]))
    assert changed == 2 * 4  # q, v, up, down in each of the 2 layers


def test_merge_models_of_a_model_trained_by_sft_trainer_uses_the_merged_weights(tmp_path, tokenizer):
    """Regression: TRL patches ``model.forward`` on the instance with a closure over the original bound method, so a
    ``copy.deepcopy`` of a trained model computed with the ORIGINAL weights; merge_models returned A's outputs."""
    from datasets import Dataset
    from trl import SFTTrainer

    from dpi_hf import merge_models
    from dpi_hf.trainer.config import DPIConfig

    model_a = tiny_llama(tokenizer, seed=0)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "a b"}],
                               "completion": [{"role": "assistant", "content": "c d"}]}] * 4)
    SFTTrainer(model_a, args=DPIConfig(str(tmp_path), max_steps=1, use_cpu=True, bf16=False, report_to=[],
                                       save_strategy="no", per_device_train_batch_size=2),
               train_dataset=rows, processing_class=tokenizer).train()
    assert "forward" in model_a.__dict__  # the patch this test is about (if TRL stops patching, the test still holds)
    model_b = tiny_llama(tokenizer, seed=1)
    merged = merge_models(model_a, model_b, 1.0)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(merged(x).logits, model_b(x).logits)
        assert not torch.equal(merged(x).logits, model_a(x).logits)


def test_merge_card_names_the_hub_ids_of_a_and_b(tmp_path, tokenizer):
    """base_model lists the Hub ids A and B have (a converted offline checkpoint names its Hub model), never a
    local path; the relation is a merge."""
    import yaml

    from dpi_hf.offline import MARKER_FILE

    a, b = _pair(tokenizer)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    (tmp_path / "A" / MARKER_FILE).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    merge_checkpoints(tmp_path / "A", tmp_path / "B", tmp_path / "m", 0.5, log=lambda _: None)
    meta = yaml.safe_load((tmp_path / "m" / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # B, a local directory, has no Hub id
    assert meta["base_model_relation"] == "merge"
    assert meta["dpi_merge"]["alpha"] == 0.5 and meta["dpi_merge"]["b"] == str(tmp_path / "B")
    assert not (tmp_path / "m" / MARKER_FILE).exists()  # the merge is not the converted model itself
