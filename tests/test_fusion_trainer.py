"""fusion="cpi" in DPITrainer on a tiny random Llama: probe models kept, fused backbone, transplant map, budget."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import dpi_args, tiny_llama
from dpi_hf import DPIConfigError, DPITrainer
from dpi_hf.core.fusion import TransplantMap, fuse_models, merge_task_vectors
from dpi_hf.trainer.fusion import importance_path, probe_model_path

torch.set_num_threads(1)


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("reliability", ["split_half", "split_half_update", "none"])
def test_cpi_run_starts_the_stages_from_the_fused_backbone(tmp_path, tokenizer, tasks, reliability):
    """Split-half Σg² probes are one fine-tune per task (its steps alternate between the halves): one probe model per
    task; split-half |θ − θ0| probes are two fine-tunes, one per half, both fused; without split halves, one."""
    model = tiny_llama(tokenizer)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = {"split_half": {}, "split_half_update": {"core_signal": "update"},
             "none": {"probe_reliability": "none"}}[reliability]
    args = dpi_args(tmp_path, fusion="cpi", fusion_stage_fraction=0.5, jaccard_threshold=1.0, overlap="raw",
                    save_stage_models=True, max_steps=6, **extra)
    trainer = DPITrainer(model, args=args, train_dataset=tasks, processing_class=tokenizer)
    trainer.train()
    out, runs = tmp_path / "out", tmp_path / "out" / "_dpi_runs"
    plan = trainer.plan
    assert len(plan.stages) == 3
    halves = [1, 2] if reliability == "split_half_update" else [None]
    members = {t: [probe_model_path(runs, t, h) for h in halves] for t in tasks}
    assert all(p.is_file() for ps in members.values() for p in ps)

    # the fusion is the engine's, from the probe models, the cores and the saved core importance, from θ0
    fused = load_file(str(runs / "fused.safetensors"))
    rows = {t: ([len(ds) // 2, len(ds) - len(ds) // 2] if len(halves) == 2 else [len(ds)]) for t, ds in tasks.items()}
    imp = [load_file(str(importance_path(runs, s[0]))) for s in plan.stages]
    expected, tmap = fuse_models(theta0, [[str(p) for p in members[s[0]]] for s in plan.stages],
                                 [trainer.cores[s[0]] for s in plan.stages], [rows[s[0]] for s in plan.stages],
                                 importance=imp)
    for n in theta0:
        assert torch.equal(_bits(fused[n]), _bits(expected[n])), n
    # each group's core elements that it owns come from its own model (the merge of its split-half probes)
    saved = TransplantMap.load(out / "dpi" / "transplant.safetensors")
    assert saved.summary()["groups"] == plan.stages and saved.summary()["owned"] == tmap.summary()["owned"]
    for g, stage in enumerate(plan.stages):
        owned = saved.owned(g)
        assert owned.count() > 0
        files = [load_file(str(p)) for p in members[stage[0]]]
        for n in owned.names():
            idx = owned.indices(n)
            if len(files) == 1:
                model_g = files[0][n].reshape(-1)
            else:
                tv = [f[n].reshape(-1).float() - theta0[n].reshape(-1) for f in files]
                model_g = (theta0[n].reshape(-1) + merge_task_vectors(tv, rows[stage[0]])).to(theta0[n].dtype)
            assert torch.equal(_bits(fused[n].reshape(-1)[idx]), _bits(model_g[idx])), (stage, n)
    # the fused model is saved, and it is what stage 1 started from: the first stage has nothing frozen, but the
    # fused weights differ from θ0 and equal fused/
    fused_dir = load_file(str(out / "fused" / "model.safetensors"))
    assert all(torch.equal(fused_dir[n], fused[n]) for n in fused)
    assert any(not torch.equal(fused[n], theta0[n]) for n in theta0)
    # stages: half of max_steps = 6, one step each, earlier cores frozen from the fused weights on
    assert [r["steps"] for r in trainer.stage_history if r["kind"] == "stage"] == [1, 1, 1]
    states = [fused] + [load_file(str(out / f"stage-{k}" / "model.safetensors")) for k in range(3)]
    for k in range(1, 3):
        frozen = plan.frozen_before(k)
        for n in frozen.names():
            idx = frozen.indices(n)
            assert torch.equal(_bits(states[k][n].reshape(-1)[idx]), _bits(states[k + 1][n].reshape(-1)[idx]))
    record = json.loads((out / "dpi" / "plan.json").read_text())
    assert record["fusion"] == "cpi" and record["fusion_stage_fraction"] == 0.5 and record["fusion_factor"] == 1.0
    card = (out / "README.md").read_text()
    assert "Fusion (CPI-FT)" in card and "transplant.safetensors" in card and "fusion: cpi" in card


@pytest.mark.parametrize("bad, match", [
    ({"fusion": "ties"}, r"fusion='ties' is not one of \('none', 'cpi'\)"),
    ({"fusion": "cpi", "fusion_factor": 0}, r"fusion_factor=0 must be a number in \(0, 2\]"),
    ({"fusion": "cpi", "fusion_factor": 3.0}, r"fusion_factor=3.0 must be a number in \(0, 2\]"),
    ({"fusion": "cpi", "fusion_stage_fraction": 0.0}, r"fusion_stage_fraction=0.0 must be a number in \(0, 1\]"),
    ({"fusion": "cpi", "fusion_stage_fraction": 1.5}, r"fusion_stage_fraction=1.5"),
    ({"fusion_factor": 0.5}, "fusion_factor is only used with fusion='cpi'"),
    ({"fusion_stage_fraction": 0.5}, "fusion_stage_fraction is only used with fusion='cpi'"),
    ({"fusion": "cpi", "masks_from": "somewhere"}, "drop masks_from or set fusion='none'"),
    ({"fusion": "cpi", "staging": "multitask"}, "staging='multitask' without freeze_cores runs no probe"),
])
def test_fusion_config_errors(tmp_path, bad, match):
    with pytest.raises(DPIConfigError, match=match):
        dpi_args(tmp_path, **bad)


def test_fusion_stage_budget_too_small_fails_before_any_work(tmp_path, tokenizer, tasks):
    args = dpi_args(tmp_path, fusion="cpi", fusion_stage_fraction=0.25, max_steps=6)  # 2 staged steps, 3 stages
    with pytest.raises(DPIConfigError, match=r"fusion_stage_fraction 0.25 = 2 staged steps.*raise max_steps or "
                                             "fusion_stage_fraction"):
        DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks, processing_class=tokenizer)
    assert not (tmp_path / "out" / "_dpi_runs").exists()


def test_stage_budget_properties(tmp_path):
    # steps: rounded half up, at least 1; epochs: scaled; no fusion: the budget as given
    assert dpi_args(tmp_path, fusion="cpi", fusion_stage_fraction=0.75, max_steps=6).stage_max_steps == 5
    assert dpi_args(tmp_path, fusion="cpi", fusion_stage_fraction=0.01, max_steps=6).stage_max_steps == 1
    epochs = dpi_args(tmp_path, fusion="cpi", fusion_stage_fraction=0.5, max_steps=-1, num_train_epochs=3)
    assert epochs.stage_num_train_epochs == 1.5 and epochs.stage_max_steps == -1
    plain = dpi_args(tmp_path, max_steps=6, num_train_epochs=3)
    assert plain.stage_max_steps == 6 and plain.stage_num_train_epochs == 3


def test_probe_only_keeps_no_probe_models(tmp_path, tokenizer, tasks):
    """probe() trains no stage: with fusion='cpi' set it must not leave a model's size on disk per probe."""
    args = dpi_args(tmp_path, fusion="cpi", probe_steps=2)
    trainer = DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks, processing_class=tokenizer)
    trainer.probe()
    assert (tmp_path / "out" / "dpi" / "cores.safetensors").is_file()
    assert not (tmp_path / "out" / "_dpi_runs" / "probe-models").exists()
