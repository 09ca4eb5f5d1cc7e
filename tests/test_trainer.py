"""DPITrainer end to end on a tiny random Llama: drop-in SFT, probes → plan → staged training, artifacts, reuse."""

import json

import pytest
import torch
from datasets import concatenate_datasets
from safetensors.torch import load_file

from conftest import dpi_args, make_tasks, tiny_llama
from dpi_hf import DPIConfig, DPIConfigError, DPITrainer, load_cores
from dpi_hf.core import StagePlan
from dpi_hf.trainer import allocate_steps

torch.set_num_threads(1)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_single_dataset_is_exactly_sfttrainer(tmp_path, tokenizer, tasks):
    from trl import SFTConfig, SFTTrainer

    kw = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4, logging_steps=1, save_strategy="no",
              report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=64, seed=0,
              disable_tqdm=True)
    ref = SFTTrainer(tiny_llama(tokenizer), args=SFTConfig(output_dir=str(tmp_path / "a"), **kw),
                     train_dataset=tasks["add"], processing_class=tokenizer)
    ref.train()
    dpi = DPITrainer(tiny_llama(tokenizer), args=DPIConfig(output_dir=str(tmp_path / "b"), **kw),
                     train_dataset=tasks["add"], processing_class=tokenizer)
    dpi.train()
    assert _losses(ref) == _losses(dpi) and len(_losses(ref)) == 4
    for (n, p), (_, q) in zip(ref.model.named_parameters(), dpi.model.named_parameters()):
        assert torch.equal(p, q), n
    assert not (tmp_path / "b" / "dpi").exists()


def test_allocate_steps():
    assert allocate_steps(10, [1, 1]) == [5, 5]
    assert allocate_steps(10, [3, 1]) == [8, 2] or allocate_steps(10, [3, 1]) == [7, 3]
    assert sum(allocate_steps(7, [5, 1, 1])) == 7 and min(allocate_steps(7, [50, 1, 1])) >= 1
    with pytest.raises(DPIConfigError, match="smaller than the number of stages"):
        allocate_steps(2, [1, 1, 1])


def test_three_tasks_end_to_end(tmp_path, tokenizer, tasks):
    model = tiny_llama(tokenizer)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dpi_args(tmp_path, jaccard_threshold=1.0, save_stage_models=True, max_steps=9)
    trainer = DPITrainer(model, args=args, train_dataset=tasks, processing_class=tokenizer,
                         eval_dataset={k: v.select(range(4)) for k, v in tasks.items()})
    trainer.train()
    out = tmp_path / "out"
    plan = trainer.plan
    assert len(plan.stages) == 3 and sorted(t for s in plan.stages for t in s) == ["add", "rev", "upper"]

    # artifacts: cores reload, plan.json has the documented keys, card has the dpi block, heatmap exists
    cores = load_cores(out / "dpi" / "cores.safetensors", model=model)
    assert list(cores) == ["add", "rev", "upper"]
    n = sum(p.numel() for p in model.parameters())
    for t, c in cores.items():
        assert c == trainer.cores[t] and c.count() == int(0.05 * n)
    record = json.loads((out / "dpi" / "plan.json").read_text())
    for key in ("tasks", "stages", "groups", "jaccard", "core_fraction", "jaccard_threshold", "core_scope",
                "frozen_counts", "model_fingerprint", "library_versions"):
        assert key in record, key
    assert StagePlan.from_dict(record).stages == plan.stages
    assert (out / "dpi" / "overlap.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "dpi:" in card and "Dynamic Parameter Isolation" in card
    forgetting = json.loads((out / "dpi" / "forgetting.json").read_text())
    assert len(forgetting) == 3 and all("eval_add_loss" in row for row in forgetting)

    # frozen elements of stage k equal those after stage k-1 bit for bit; the rest moved
    states = [theta0] + [load_file(str(out / f"stage-{k}" / "model.safetensors")) for k in range(3)]
    for k in range(1, 3):
        frozen = plan.frozen_before(k)
        assert frozen.count() > 0
        moved = 0
        for name in frozen.names():
            before, after = states[k][name].reshape(-1), states[k + 1][name].reshape(-1)
            idx = frozen.indices(name)
            assert torch.equal(before[idx].view(torch.int32), after[idx].view(torch.int32)), (k, name)
            free = torch.ones_like(before, dtype=torch.bool)
            free[idx] = False
            moved += int((before[free] != after[free]).sum())
        assert moved > 0
    # the staged budget is the total: 9 steps over 3 equal stages
    assert [r["steps"] for r in trainer.stage_history if r["kind"] == "stage"] == [3, 3, 3]
    # examples are counted at the training step: every probe and stage step saw a full batch
    bs = args.per_device_train_batch_size
    for r in trainer.phase_records:
        assert r.examples == r.steps * bs and r.tasks, r
    # split-half probes (the default) with Σg²: one pass per task, its steps alternating between the two halves
    assert [(r.kind, r.half) for r in trainer.phase_records] == [("probe", None)] * 3 + [("stage", None)] * 3
    assert all("two alternating halves" in r.name for r in trainer.phase_records if r.kind == "probe")
    assert all(r.tokens > r.examples for r in trainer.phase_records)  # tokens through forward and backward


def test_probes_reproducible_and_masks_from_skips_probes(tmp_path, tokenizer, tasks):
    a = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "a", max_steps=3), train_dataset=tasks,
                   processing_class=tokenizer)
    a.train()
    b = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "b", max_steps=3), train_dataset=tasks,
                   processing_class=tokenizer)
    b.train()
    for t in tasks:
        assert a.cores[t] == b.cores[t]
    reuse = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "c", max_steps=3,
                                                            masks_from=str(tmp_path / "a" / "out")),
                       train_dataset=tasks, processing_class=tokenizer)
    reuse.train()
    assert reuse.plan.stages == a.plan.stages and reuse.plan.jaccard == a.plan.jaccard
    assert not (tmp_path / "c" / "out" / "_dpi_runs" / "probes").exists()
    assert not any(r["kind"] == "probe" for r in reuse.stage_history)


def test_task_column_dataset_and_baselines(tmp_path, tokenizer, tasks):
    mixed = concatenate_datasets([ds.add_column("task", [t] * len(ds)) for t, ds in tasks.items()]).shuffle(seed=1)
    tr = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, staging="random", max_steps=3),
                    train_dataset=mixed, processing_class=tokenizer)
    assert list(tr.tasks) == list(dict.fromkeys(mixed["task"]))
    tr.train()
    assert len(tr.plan.stages) == 3 and tr.plan.frozen_counts == [0, 0, 0]
    assert not (tmp_path / "out" / "_dpi_runs" / "probes").exists()  # baselines without freezing never probe
    mt = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "m", staging="multitask", max_steps=3),
                    train_dataset=tasks, processing_class=tokenizer)
    mt.train()
    assert mt.plan.stages == [["add", "rev", "upper"]]
    given = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "g", staging="given", max_steps=4,
                                                            stage_groups=[["add", "rev"], ["upper"]]),
                       train_dataset=tasks, processing_class=tokenizer)
    given.train()
    assert given.plan.stages == [["add", "rev"], ["upper"]]
    assert [r["steps"] for r in given.stage_history] == [3, 1]  # proportional to 48 vs 24 examples


@pytest.mark.parametrize("bad,match", [
    (dict(core_fraction=0.0), "core_fraction"),
    (dict(core_fraction=1.5), "core_fraction"),
    (dict(jaccard_threshold=2.0), "jaccard_threshold"),
    (dict(staging="sideways"), "staging"),
    (dict(staging="given"), "stage_groups"),
    (dict(core_scope="layer"), "core_scope"),
    (dict(probe_steps=0), "probe_steps"),
])
def test_config_errors(tmp_path, bad, match):
    with pytest.raises(DPIConfigError, match=match):
        dpi_args(tmp_path, **bad)


def test_trainer_input_errors(tmp_path, tokenizer, tasks):
    from datasets import Dataset

    with pytest.raises(DPIConfigError, match="empty"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path), processing_class=tokenizer,
                   train_dataset={"add": tasks["add"], "none": Dataset.from_list([])})
    with pytest.raises(DPIConfigError, match="stage_groups names unknown task .chat."):
        DPITrainer(tiny_llama(tokenizer), processing_class=tokenizer, train_dataset=tasks,
                   args=dpi_args(tmp_path, staging="given", stage_groups=[["add", "rev"], ["chat"]]))
    with pytest.raises(DPIConfigError, match="at least two tasks"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, core_fraction=0.02), processing_class=tokenizer,
                   train_dataset=tasks["add"].add_column("task", ["add"] * len(tasks["add"])))
    with pytest.raises(DPIConfigError, match="no DPI artifacts"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, masks_from=str(tmp_path)),
                   processing_class=tokenizer, train_dataset=tasks)
    assert not (tmp_path / "out").exists()  # nothing written before the errors


def test_masks_from_another_model_refused(tmp_path, tokenizer, tasks):
    a = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "a", max_steps=3), train_dataset=tasks,
                   processing_class=tokenizer)
    a.train()
    from dpi_hf import FingerprintMismatchError

    with pytest.raises(FingerprintMismatchError, match="another model"):
        DPITrainer(tiny_llama(tokenizer, hidden=48), processing_class=tokenizer, train_dataset=tasks,
                   args=dpi_args(tmp_path / "b", masks_from=str(tmp_path / "a" / "out")))
    with pytest.raises(DPIConfigError, match="no core for tasks"):
        DPITrainer(tiny_llama(tokenizer), processing_class=tokenizer,
                   train_dataset={**tasks, "extra": tasks["add"]},
                   args=dpi_args(tmp_path / "c", masks_from=str(tmp_path / "a" / "out")))


def test_push_to_hub_uploads_model_masks_plan_and_card(tmp_path, tokenizer, tasks, monkeypatch):
    import fnmatch
    import types

    import transformers.trainer as hf_trainer

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return types.SimpleNamespace(repo_id=f"me/{repo_id}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kw):
            from pathlib import Path

            files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            uploaded["repo"] = repo_id
            uploaded["files"] = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)]
            return "ok"

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    trainer = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, max_steps=3), train_dataset=tasks,
                         processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub()
    files = uploaded["files"]
    for f in ("model.safetensors", "README.md", "dpi/cores.safetensors", "dpi/plan.json", "dpi/overlap.png"):
        assert f in files, f
    assert not any(f.startswith("_dpi_runs") for f in files)  # checkpoints and resume state stay local
    card = (tmp_path / "out" / "README.md").read_text()
    assert "dpi:" in card and "Dynamic Parameter Isolation" in card and "| stage | tasks |" in card


def test_callbacks_in_a_plain_trainer(tmp_path, tokenizer, tasks):
    """CoreProbeCallback then FreezeMaskCallback in transformers.Trainer (no TRL) keep their promises."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from dpi_hf import CoreProbeCallback, FreezeMaskCallback

    def tokenize(ds):
        def fn(ex):
            text = ex["prompt"][0]["content"] + " = " + ex["completion"][0]["content"]
            return tokenizer(text, truncation=True, max_length=32)
        return ds.map(fn, remove_columns=ds.column_names)

    args = TrainingArguments(output_dir=str(tmp_path / "p"), per_device_train_batch_size=4, max_steps=5,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = tiny_llama(tokenizer)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = CoreProbeCallback(core_fraction=0.02, task_name="add", save_path=tmp_path / "add.safetensors",
                              signal="update")
    Trainer(model=model, args=args, train_dataset=tokenize(tasks["add"]), data_collator=collator,
            callbacks=[probe]).train()
    n = sum(p.numel() for p in model.parameters())
    assert probe.core.count() == int(0.02 * n)
    assert load_cores(tmp_path / "add.safetensors", model=model)["add"] == probe.core
    # the core holds the largest updates: its smallest |Δ| ≥ the largest |Δ| outside it
    deltas = {k: (p.detach() - theta0[k]).abs().reshape(-1) for k, p in model.named_parameters()}
    inside = torch.cat([deltas[k][probe.core.indices(k)] for k in deltas])
    outside = torch.cat([deltas[k][~probe.core.dense(k).reshape(-1)] for k in deltas])
    assert inside.min() >= outside.max()

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    freeze = FreezeMaskCallback(probe.core)
    Trainer(model=model, args=args, train_dataset=tokenize(tasks["rev"]), data_collator=collator,
            callbacks=[freeze]).train()
    moved = 0
    for k, p in model.named_parameters():
        idx = probe.core.indices(k)
        assert torch.equal(p.detach().reshape(-1)[idx].view(torch.int32), before[k].reshape(-1)[idx].view(torch.int32))
        moved += int((p.detach() != before[k]).sum())
    assert moved > 0 and freeze.freezer is None  # detached at the end


def test_diverged_probe_names_the_task(tmp_path, tokenizer, tasks):
    from dpi_hf import ProbeDivergedError

    # a probe fine-tune (no-step probes never apply the learning rate)
    trainer = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, probe_learning_rate=1e38, max_grad_norm=0,
                                                              max_steps=3, probe_updates_weights=True),
                         train_dataset=tasks,
                         processing_class=tokenizer)
    with pytest.raises(ProbeDivergedError, match="probe of task 'add' diverged"):
        trainer.train()
    assert not (tmp_path / "out" / "dpi" / "cores.safetensors").exists()
    assert not (tmp_path / "out" / "README.md").exists()


def test_dpi_with_one_group_trains_exactly_what_multitask_trains(tmp_path, tokenizer, tasks):
    """When the plan is one stage (all tasks overlap above τ), DPI's training is the multitask baseline's, bit for
    bit: the probes are extra cost, never a different training run."""
    dpi = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "d", jaccard_threshold=0.0, max_steps=4),
                     train_dataset=tasks, processing_class=tokenizer)
    dpi.train()
    mt = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "m", staging="multitask", max_steps=4),
                    train_dataset=tasks, processing_class=tokenizer)
    mt.train()
    assert dpi.plan.stages == mt.plan.stages == [["add", "rev", "upper"]]
    for (n, p), (_, q) in zip(dpi.model.named_parameters(), mt.model.named_parameters()):
        assert torch.equal(p, q), n
