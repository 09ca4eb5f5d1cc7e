"""dpi/importance.safetensors: written by probes with save_importance=True (the bf16 mean per optimizer step), read
back, and reused for cores at another p (probe_cores / dpi-hf probe --importance_from) without probing again."""

import json

import pytest
import torch
import yaml
from conftest import dpi_args, make_tasks, tiny_llama
from safetensors import safe_open

from dpi_hf import DPIConfigError, load_cores, probe_cores
from dpi_hf.artifacts import load_importance, read_importance_metadata, save_importance
from dpi_hf.cli import main as cli_main


def test_save_and_load_importance_round_trip(tmp_path, tokenizer):
    model = tiny_llama(tokenizer)
    g = torch.Generator().manual_seed(0)
    imp = {"a": {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()},
           "b": {"lm_head.weight": torch.rand(model.lm_head.weight.shape, generator=g)}}
    path = save_importance(tmp_path / "run", imp, {"a": 3, "b": 8}, signal="fisher", model=model, probe_steps=3)
    assert path == tmp_path / "run" / "dpi" / "importance.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}  # 2 bytes per element per task
    assert keys == {f"a/{n}" for n in imp["a"]} | {"b/lm_head.weight"}
    meta = read_importance_metadata(path)
    assert meta["tasks"] == ["a", "b"] and meta["batches"] == {"a": 3, "b": 8} and meta["signal"] == "fisher"
    assert meta["statistic"] == "mean per optimizer step" and meta["probe_steps"] == 3
    assert meta["fingerprint"]["content"]
    back = load_importance(tmp_path / "run", model=model, check_content=True)
    for task in imp:
        for n, t in imp[task].items():
            assert back[task][n].dtype == torch.float32
            assert torch.equal(back[task][n], t.to(torch.bfloat16).float())
    assert list(load_importance(tmp_path / "run", tasks=["b"])) == ["b"]
    with pytest.raises(DPIConfigError, match="no task"):
        load_importance(tmp_path / "run", tasks=["c"])
    with pytest.raises(DPIConfigError, match="batches"):
        save_importance(tmp_path / "x", imp, {"a": 0, "b": 1}, signal="fisher")
    from dpi_hf import CoreMask, save_cores

    save_cores({"a": CoreMask.from_indices({}, {"w": (2,)})}, tmp_path / "cores-only" / "dpi" / "cores.safetensors")
    with pytest.raises(DPIConfigError, match="its importance was not stored.*save_importance=True"):
        load_importance(tmp_path / "cores-only")


def test_the_mean_over_the_probe_steps_is_stored(tmp_path, tokenizer):
    """The stored value is the probe's accumulated Σg² divided by its optimizer steps (pooled over split halves)."""
    from dpi_hf.trainer.importance import collect_importance, save_probe_importance

    total = {"w": torch.tensor([[1.0, 6.0], [300.0, 1e-6]])}
    save_probe_importance(tmp_path / "runs", "t", total, 3)
    collect_importance(tmp_path / "runs", tmp_path / "out", ["t"], {"parameters": {}}, signal="fisher")
    stored = load_importance(tmp_path / "out")["t"]["w"]
    assert torch.equal(stored, (total["w"] / 3).to(torch.bfloat16).float())
    assert read_importance_metadata(tmp_path / "out" / "dpi" / "importance.safetensors")["batches"] == {"t": 3}


@pytest.mark.parametrize("reliability", ["none", "split_half"])
def test_probe_cores_stores_the_importance(tmp_path, tokenizer, tasks, reliability):
    model = tiny_llama(tokenizer)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "p"), save_importance=True, probe_reliability=reliability,
                    overlap="raw", probe_steps=3, gradient_accumulation_steps=2)
    cores = probe_cores(model, {"add": tasks["add"], "rev": tasks["rev"]}, args, processing_class=tokenizer)
    meta = read_importance_metadata(tmp_path / "p" / "dpi" / "importance.safetensors")
    # a split-half probe reads both halves in one pass of probe_steps batches (alternating), so 3 either way
    assert meta["tasks"] == ["add", "rev"] and meta["batches"] == {"add": 3, "rev": 3}
    assert meta["signal"] == "fisher" and meta["probe_steps"] == 3
    stored = load_importance(tmp_path / "p", model=model, check_content=True)
    assert set(stored["add"]) == {n for n, _ in model.named_parameters()}
    from dpi_hf import select_core

    for task in cores:  # the probe's own cores, from the stored values at the same p (up to bf16 ties)
        again = select_core(stored[task], 0.05)
        assert again.jaccard(cores[task]) > 0.98


def _assert_same_up_to_bf16_ties(fresh, stored_core, stored_importance):
    """The cores differ only at elements whose bf16 importance equals the selection threshold's (a tie that bf16
    rounding created and selection broke by position)."""
    differing = fresh.union(stored_core).count() - fresh.intersection_count(stored_core)
    threshold = min(float(stored_importance[n].flatten()[stored_core.indices(n)].min())
                    for n in stored_core.names() if stored_core.count(n))
    for n in fresh.names():
        sym = set(fresh.indices(n).tolist()) ^ set(stored_core.indices(n).tolist())
        for i in sym:
            assert float(stored_importance[n].flatten()[i]) == threshold, (n, i)
    assert differing <= 0.01 * fresh.count() + 2


def test_cores_at_another_p_from_stored_importance_equal_a_fresh_probe(tmp_path, tokenizer, tasks):
    data = {"add": tasks["add"], "rev": tasks["rev"]}
    model = tiny_llama(tokenizer)
    probe_cores(model, data, dpi_args(tmp_path, output_dir=str(tmp_path / "p05"), save_importance=True),
                processing_class=tokenizer)
    fresh = probe_cores(model, data, dpi_args(tmp_path, output_dir=str(tmp_path / "p20"), core_fraction=0.2),
                        processing_class=tokenizer)
    reused = probe_cores(model, None, dpi_args(tmp_path, output_dir=str(tmp_path / "r20"), core_fraction=0.2),
                         importance_from=str(tmp_path / "p05"))
    stored = load_importance(tmp_path / "p05")
    for task in data:
        assert reused[task].count() == fresh[task].count()
        _assert_same_up_to_bf16_ties(fresh[task], reused[task], stored[task])
    # written like a probe's: cores (loadable against the model), plan, importance copy, card
    saved = load_cores(tmp_path / "r20" / "dpi" / "cores.safetensors", model=model, check_content=True)
    assert saved == reused
    meta = json.loads((tmp_path / "r20" / "dpi" / "plan.json").read_text())
    assert meta["core_fraction"] == 0.2 and meta["importance_from"] == str(tmp_path / "p05")
    assert (tmp_path / "r20" / "dpi" / "importance.safetensors").is_file()
    # other weights: refused before anything is written
    with pytest.raises(DPIConfigError, match="does not belong to this model"):
        probe_cores(tiny_llama(tokenizer, seed=4), None, dpi_args(tmp_path, output_dir=str(tmp_path / "bad")),
                    importance_from=str(tmp_path / "p05"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DPIConfigError, match="holds no dpi/importance.safetensors"):
        probe_cores(model, None, dpi_args(tmp_path, output_dir=str(tmp_path / "bad")),
                    importance_from=str(tmp_path / "p20"))


def test_save_importance_needs_probes(tmp_path):
    with pytest.raises(DPIConfigError, match="probes nothing"):
        dpi_args(tmp_path, save_importance=True, masks_from=str(tmp_path))


def test_cli_probe_with_importance_from(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tasks = []
    for name, ds in make_tasks(n=20).items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in ds.to_list()))
        tasks.append({"name": name, "source": "prompt_completion", "path": str(path)})
    recipe = {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "tasks": tasks[:2],
              "runtime": {"num_threads": 1}, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "probe_steps": 2, "core_fraction": 0.05, "report_to": "none", "use_cpu": True,
              "bf16": False, "max_length": 64, "seed": 0, "disable_tqdm": True, "dataset_num_proc": None,
              "save_strategy": "no", "gradient_checkpointing": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["probe", str(path), "--save_importance", "true"]) == 0
    assert (tmp_path / "out" / "dpi" / "importance.safetensors").is_file()
    capsys.readouterr()
    rc = cli_main(["probe", str(path), "--importance_from", str(tmp_path / "out"), "--core_fraction", "0.1",
                   "--output_dir", str(tmp_path / "p10")])
    out = capsys.readouterr().out
    assert rc == 0 and "no probe run" in out
    meta = json.loads((tmp_path / "p10" / "dpi" / "plan.json").read_text())
    assert meta["core_fraction"] == 0.1 and meta["tasks"] == ["add", "rev"]
    assert cli_main(["probe", str(path), "--importance_from", str(tmp_path / "p10" / "missing"),
                     "--output_dir", str(tmp_path / "p11")]) == 2
    assert "holds no dpi/importance.safetensors" in capsys.readouterr().err
