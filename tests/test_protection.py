"""Protecting existing skills: probe_cores on the model as it is, and protect_cores_from through whole runs."""

import json

import pytest
import torch
from conftest import dpi_args, tiny_llama

from dpi_hf import DPIConfigError, FingerprintMismatchError, load_cores, probe_cores
from dpi_hf.trainer import DPITrainer


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged_on(model, core, before):
    """Every element of ``core`` holds its value from ``before``, bit for bit."""
    for n, p in model.named_parameters():
        if n in core:
            idx = core.indices(n)
            assert torch.equal(p.detach().flatten()[idx], before[n].flatten()[idx]), n


def _model_with_old_core(tmp_path, tokenizer, tasks):
    """A tiny model, the core of its skill "old" (the add task) in tmp_path/cores, and its weights before training."""
    model = tiny_llama(tokenizer)
    cores = probe_cores(model, {"old": tasks["add"]}, dpi_args(tmp_path, output_dir=str(tmp_path / "cores")),
                        processing_class=tokenizer)
    return model, cores["old"], _state(model)


def _probe(tmp_path, tokenizer, model, tasks, name="cores", **kw):
    args = dpi_args(tmp_path, output_dir=str(tmp_path / name), **kw)
    return probe_cores(model, {t: tasks[t] for t in ("add",)}, args, processing_class=tokenizer), args


@pytest.mark.parametrize("updates", [True, False])
def test_probe_cores_leaves_the_model_unchanged(tmp_path, tokenizer, tasks, updates):
    model = tiny_llama(tokenizer)
    before = _state(model)
    # weight decay and accumulation: a no-step probe that zeroed the gradients instead of dropping them would still
    # move every weight through AdamW's decoupled decay
    cores, args = _probe(tmp_path, tokenizer, model, tasks, probe_updates_weights=updates, probe_steps=4,
                         probe_weight_decay=0.3, gradient_accumulation_steps=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    core = cores["add"]
    assert core.count() > 0
    # written like any run's cores: loadable against this model, with the split-half reliability report
    saved = load_cores(tmp_path / "cores" / "dpi" / "cores.safetensors", model=model, check_content=True)
    assert saved["add"] == core
    plan = json.loads((tmp_path / "cores" / "dpi" / "plan.json").read_text())
    assert plan["tasks"] == ["add"] and 0.0 <= plan["reliability"]["add"] <= 1.0
    assert plan["probe_updates_weights"] is updates
    assert "Probes and plan only" in (tmp_path / "cores" / "README.md").read_text()


def test_no_step_probe_reads_the_gradients_at_the_current_weights(tmp_path, tokenizer, tasks):
    """A no-step Σg² probe of n batches = the sum of the n batches' squared gradients at θ, all at the same θ."""
    from dpi_hf.callbacks import CoreProbeCallback
    from trl import SFTTrainer

    model = tiny_llama(tokenizer)
    args = dpi_args(tmp_path, max_steps=3, per_device_train_batch_size=4, max_grad_norm=0.0, weight_decay=0.3)
    cb = CoreProbeCallback(0.05, signal="fisher", keep_importance=True, update_weights=False)
    trainer = SFTTrainer(model, args=args, train_dataset=tasks["add"], processing_class=tokenizer, callbacks=[cb])
    before = _state(model)
    trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the same batches by hand, at the unchanged weights
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    loader = trainer.get_train_dataloader()
    for i, batch in zip(range(3), loader):
        model.zero_grad()
        trainer.compute_loss(model, batch).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.float() ** 2
    for n in expected:
        torch.testing.assert_close(cb.importance[n], expected[n], rtol=1e-4, atol=1e-9)


def test_update_signal_without_steps_is_refused(tmp_path):
    from dpi_hf.callbacks import CoreProbeCallback

    with pytest.raises(DPIConfigError, match="probe_updates_weights=False"):
        dpi_args(tmp_path, core_signal="update", probe_updates_weights=False)
    with pytest.raises(DPIConfigError, match="update_weights=False"):
        CoreProbeCallback(signal="update", update_weights=False)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_protection_is_bit_exact_through_a_single_dataset_run(tmp_path, tokenizer, tasks, accumulation):
    """One dataset: SFTTrainer plus the protection; weight decay and accumulation must not move a protected element."""
    model = tiny_llama(tokenizer)
    cores, _ = _probe(tmp_path, tokenizer, model, tasks)
    before = _state(model)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"),
                    weight_decay=0.1, gradient_accumulation_steps=accumulation, max_steps=5, learning_rate=5e-2)
    trainer = DPITrainer(model, args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    assert trainer.tasks is None  # plain SFT ...
    trainer.train()
    core = cores["add"]
    moved = 0
    for n, p in model.named_parameters():
        after = p.detach().flatten()
        if n in core:
            idx = core.indices(n)
            assert torch.equal(after[idx], before[n].flatten()[idx]), n  # ... plus the protection, bit for bit
            keep = torch.ones_like(after, dtype=torch.bool)
            keep[idx] = False
            moved += int((after[keep] != before[n].flatten()[keep]).sum())
        else:
            moved += int((after != before[n].flatten()).sum())
    assert moved > 0  # the rest trained
    record = json.loads((tmp_path / "train" / "dpi" / "protected.json").read_text())
    assert record["tasks"] == ["add"] and record["elements"] == core.count()
    assert record["source"] == str(tmp_path / "cores")
    card = (tmp_path / "train" / "README.md").read_text()
    assert "Protected cores" in card and "`add`" in card and record["digest"][:12] in card


def test_protection_with_dpi_stages(tmp_path, tokenizer, tasks):
    """Several tasks: the protected cores stay frozen in every stage, on top of the plan's own frozen cores."""
    model, core, before = _model_with_old_core(tmp_path, tokenizer, tasks)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"),
                    protect_tasks=["old"], staging="given", stage_groups=[["rev"], ["upper"]], max_steps=4,
                    weight_decay=0.1, freeze_cores=True)
    trainer = DPITrainer(model, args=args, train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]},
                         processing_class=tokenizer)
    trainer.train()
    _assert_unchanged_on(model, core, before)
    # stage 1 freezes the protected cores; stage 2 their union with rev's own core (the plan's frozen set)
    stages = [r for r in trainer.phase_records if r.kind == "stage"]
    union = core.union(trainer.cores["rev"])
    assert union.count() > core.count()
    assert [r.frozen for r in stages] == [core.count(), union.count()]
    plan = json.loads((tmp_path / "train" / "dpi" / "plan.json").read_text())
    assert plan["protected"]["tasks"] == ["old"] and plan["protected"]["elements"] == core.count()
    assert json.loads((tmp_path / "train" / "dpi" / "protected.json").read_text()) == plan["protected"]
    assert "Protected cores" in (tmp_path / "train" / "README.md").read_text()


def test_protected_run_refuses_masks_from_another_checkpoint(tmp_path, tokenizer, tasks):
    _probe(tmp_path, tokenizer, tiny_llama(tokenizer, seed=0), tasks)
    other = tiny_llama(tokenizer, seed=1)  # same architecture, other weights
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"))
    with pytest.raises(FingerprintMismatchError, match="other weights"):
        DPITrainer(other, args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    assert not (tmp_path / "train").exists()  # refused before anything was written
    # allow_mask_mismatch accepts them and says so
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"),
                    allow_mask_mismatch=True, max_steps=1)
    trainer = DPITrainer(other, args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    assert trainer.protection["other_weights"]
    trainer.train()
    assert "allow_mask_mismatch" in (tmp_path / "train" / "README.md").read_text()


def test_protection_bad_input_fails_before_training(tmp_path, tokenizer, tasks):
    model = tiny_llama(tokenizer)
    _probe(tmp_path, tokenizer, model, tasks)

    def make(**kw):
        args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), **kw)
        return DPITrainer(model, args=args, train_dataset=tasks["rev"], processing_class=tokenizer)

    with pytest.raises(DPIConfigError, match=r"protect_tasks names \['nope'\].*holds \['add'\]"):
        make(protect_cores_from=str(tmp_path / "cores"), protect_tasks=["nope"])
    (tmp_path / "plan-only" / "dpi").mkdir(parents=True)
    (tmp_path / "plan-only" / "dpi" / "plan.json").write_text(
        (tmp_path / "cores" / "dpi" / "plan.json").read_text())
    with pytest.raises(DPIConfigError, match="no cores.safetensors: nothing to protect"):
        make(protect_cores_from=str(tmp_path / "plan-only"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DPIConfigError, match="holds no DPI artifacts"):
        make(protect_cores_from=str(tmp_path / "empty"))
    with pytest.raises(DPIConfigError, match="protect_cores_from is not set"):
        dpi_args(tmp_path, protect_tasks=["add"])
    with pytest.raises(DPIConfigError, match="non-empty list"):
        dpi_args(tmp_path, protect_cores_from="x", protect_tasks=[])
    assert not (tmp_path / "train").exists()
    # probe_cores: a dataset without task names, nothing to probe
    with pytest.raises(DPIConfigError, match="has no name"):
        probe_cores(model, tasks["add"], dpi_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(DPIConfigError, match="at least one named dataset"):
        probe_cores(model, {}, dpi_args(tmp_path), processing_class=tokenizer)


def test_protected_run_resume_checks_identity(tmp_path, tokenizer, tasks):
    import shutil

    model = tiny_llama(tokenizer)
    _probe(tmp_path, tokenizer, model, tasks, name="cores")
    _probe(tmp_path, tokenizer, model, {"add": tasks["upper"]}, name="cores2")
    base = dict(output_dir=str(tmp_path / "train"), max_steps=4, save_strategy="steps", save_steps=2,
                weight_decay=0.1, learning_rate=5e-2)
    args = dpi_args(tmp_path, protect_cores_from=str(tmp_path / "cores"), **base)
    full = DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    full.train()
    uninterrupted = _state(full.model)
    # a fresh run in the same output_dir is refused
    with pytest.raises(DPIConfigError, match="already holds a DPI run"):
        DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks["rev"], processing_class=tokenizer).train()
    # resuming with other protected cores is refused, naming the field ...
    other = dpi_args(tmp_path, protect_cores_from=str(tmp_path / "cores2"), **base)
    with pytest.raises(DPIConfigError, match="protect_cores_from"):
        DPITrainer(tiny_llama(tokenizer), args=other, train_dataset=tasks["rev"],
                   processing_class=tokenizer).train(resume_from_checkpoint=True)
    # ... and so is the same path holding other cores (the cores file's digest is part of the identity)
    shutil.copytree(tmp_path / "cores", tmp_path / "cores-saved")
    shutil.copy(tmp_path / "cores2" / "dpi" / "cores.safetensors", tmp_path / "cores" / "dpi" / "cores.safetensors")
    with pytest.raises(DPIConfigError, match="protect_digest"):
        DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks["rev"],
                   processing_class=tokenizer).train(resume_from_checkpoint=True)
    shutil.rmtree(tmp_path / "cores")
    shutil.copytree(tmp_path / "cores-saved", tmp_path / "cores")
    # as if killed after step 2: resuming from checkpoint-2 ends where the uninterrupted run ended, bit for bit
    shutil.rmtree(tmp_path / "train" / "checkpoint-4")
    resumed = DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    after = _state(resumed.model)
    for n in uninterrupted:
        assert torch.equal(after[n], uninterrupted[n]), n


def test_protection_survives_cpi_fusion(tmp_path, tokenizer, tasks):
    """The fused backbone replaces the weights the stages start from; protected elements keep their values."""
    model, core, before = _model_with_old_core(tmp_path, tokenizer, tasks)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"),
                    fusion="cpi", max_steps=3, probe_steps=2)
    trainer = DPITrainer(model, args=args, train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]},
                         processing_class=tokenizer)
    trainer.train()
    _assert_unchanged_on(model, core, before)
    assert (tmp_path / "train" / "dpi" / "transplant.safetensors").is_file()


def test_fusion_needs_probes_that_step(tmp_path):
    with pytest.raises(DPIConfigError, match="probe_updates_weights=False takes no step"):
        dpi_args(tmp_path, fusion="cpi", probe_updates_weights=False)


def test_card_keeps_the_protection_after_create_model_card(tmp_path, tokenizer, tasks):
    """TRL's create_model_card (push_to_hub, checkpoints) rewrites README.md; the protection section must survive."""
    model = tiny_llama(tokenizer)
    _probe(tmp_path, tokenizer, model, tasks)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "train"), protect_cores_from=str(tmp_path / "cores"),
                    max_steps=1)
    trainer = DPITrainer(model, args=args, train_dataset=tasks["rev"], processing_class=tokenizer)
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "train" / "README.md").read_text()
    assert card.count("<!-- dpi-hf:start -->") == 1 and "Protected cores: the cores of `add`" in card
