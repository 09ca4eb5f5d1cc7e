"""protect_method ewc / freeze_ewc / l2sp through DPITrainer: λ = 0 changes nothing, a large λ holds θ_A, the penalty
applies once per optimizer step, freeze_ewc keeps the core bit-exact, and bad input fails before any work."""

import json

import pytest
import torch
from conftest import dpi_args, tiny_llama

from dpi_hf import CoreMask, DPIConfigError, save_cores
from dpi_hf.artifacts import save_importance
from dpi_hf.trainer import DPITrainer


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _source(tmp_path, model, importance=True, name="src"):
    """A protection source for ``model``: the core of task "old" (a few elements of three tensors) and, optionally,
    its stored importance (positive, random)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    core = CoreMask.from_indices({"model.layers.0.mlp.up_proj.weight": torch.arange(0, 500, 7),
                                  "model.layers.1.self_attn.q_proj.weight": torch.arange(3, 300, 5),
                                  "lm_head.weight": torch.arange(0, 100, 2)}, shapes)
    save_cores({"old": core}, tmp_path / name / "dpi" / "cores.safetensors", model=model, core_fraction=0.01)
    if importance:
        g = torch.Generator().manual_seed(5)
        imp = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
        save_importance(tmp_path / name, {"old": imp}, {"old": 4}, signal="fisher", model=model)
    return core


def _train(tmp_path, tokenizer, tasks, out, dtype=torch.float32, **kw):
    model = tiny_llama(tokenizer).to(dtype)
    base = dict(output_dir=str(tmp_path / out), max_steps=4, learning_rate=2e-2, weight_decay=0.1,
                gradient_accumulation_steps=2)
    base.update(kw)
    trainer = DPITrainer(model, args=dpi_args(tmp_path, **base), train_dataset=tasks["rev"],
                         processing_class=tokenizer)
    trainer.train()
    return model, trainer


def _penalties(trainer):
    return [h["protect_penalty"] for h in trainer.state.log_history if "protect_penalty" in h]


@pytest.mark.parametrize("form", ["loss", "decoupled"])
def test_zero_lambda_is_bit_identical_to_no_protection(tmp_path, tokenizer, tasks, form):
    _source(tmp_path, tiny_llama(tokenizer))
    plain, _ = _train(tmp_path, tokenizer, tasks, "plain")
    ewc, trainer = _train(tmp_path, tokenizer, tasks, "ewc", protect_cores_from=str(tmp_path / "src"),
                          protect_method="ewc", protect_lambda=0.0, protect_ewc_form=form)
    for n, p in ewc.named_parameters():
        assert torch.equal(p, plain.get_parameter(n)), n
    assert _penalties(trainer) == [0.0] * 4  # logged at every optimizer step (logging_steps=1), λ = 0
    record = json.loads((tmp_path / "ewc" / "dpi" / "protected.json").read_text())
    assert record["protect_method"] == "ewc" and record["protect_lambda"] == 0.0
    card = (tmp_path / "ewc" / "README.md").read_text()
    assert "EWC penalty (λ = 0.0" in card and "stayed frozen" not in card


def test_the_protection_mode_is_part_of_a_protected_run_identity(tmp_path):
    """A resume with another λ, form, scope or method is refused like any other changed setting."""
    from datasets import Dataset

    from dpi_hf.trainer.run_state import changed_fields, protected_run_identity

    rows = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    fingerprint = {"sha256": "a", "content": "b"}
    base = dict(protect_cores_from=str(tmp_path), protect_method="ewc", protect_lambda=1.0)
    saved = protected_run_identity(dpi_args(tmp_path, **base), rows, fingerprint, "d")
    for change in ({"protect_lambda": 2.0}, {"protect_ewc_form": "decoupled"}, {"protect_ewc_scope": "core"},
                   {"protect_method": "l2sp"}):
        now = protected_run_identity(dpi_args(tmp_path, **(base | change)), rows, fingerprint, "d")
        assert [c.split(":")[0] for c in changed_fields(saved, now)] == list(change)


@pytest.mark.parametrize("form", ["loss", "decoupled"])
def test_large_lambda_keeps_the_weights_near_the_anchor(tmp_path, tokenizer, tasks, form):
    theta_a = _state(tiny_llama(tokenizer))
    _source(tmp_path, tiny_llama(tokenizer))

    def distance(model):
        return sum(float(((p.detach() - theta_a[n]) ** 2).sum()) for n, p in model.named_parameters()) ** 0.5

    plain, _ = _train(tmp_path, tokenizer, tasks, "plain", max_steps=6)
    held, trainer = _train(tmp_path, tokenizer, tasks, "held", max_steps=6, protect_cores_from=str(tmp_path / "src"),
                           protect_method="ewc", protect_lambda=1e4, protect_ewc_form=form)
    assert distance(plain) > 0.5
    if form == "decoupled":  # lr·λ·F >= 1 everywhere: every step ends back at θ_A
        assert distance(held) < 1e-5
    else:  # Adam turns the huge gradient into steps of about lr around θ_A instead of a drift
        assert distance(held) < 0.25 * distance(plain)
    assert all(v >= 0 for v in _penalties(trainer))


def test_freeze_ewc_keeps_the_core_bit_exact(tmp_path, tokenizer, tasks):
    theta_a = _state(tiny_llama(tokenizer))
    core = _source(tmp_path, tiny_llama(tokenizer))
    for form in ("loss", "decoupled"):
        model, trainer = _train(tmp_path, tokenizer, tasks, f"fe-{form}", protect_cores_from=str(tmp_path / "src"),
                                protect_method="freeze_ewc", protect_lambda=1.0, protect_ewc_form=form)
        moved = 0
        for n, p in model.named_parameters():
            flat = p.detach().flatten()
            if n in core and core.count(n):
                idx = core.indices(n)
                assert torch.equal(flat[idx], theta_a[n].flatten()[idx]), (form, n)
            moved += int((flat != theta_a[n].flatten()).sum())
        assert moved > 0 and max(_penalties(trainer)) > 0


@pytest.mark.parametrize("form", ["loss", "decoupled"])
def test_bf16_model_with_bf16_training(tmp_path, tokenizer, tasks, form):
    """A bf16 model trained with bf16=True: λ = 0 is bit-identical to no protection, and freeze_ewc keeps the core
    bit-exact while the penalty (computed in float32 against a float32 θ_A) moves the rest."""
    theta_a = {n: t.to(torch.bfloat16) for n, t in _state(tiny_llama(tokenizer)).items()}
    core = _source(tmp_path, tiny_llama(tokenizer).to(torch.bfloat16))
    common = dict(dtype=torch.bfloat16, bf16=True, learning_rate=5e-2)
    plain, _ = _train(tmp_path, tokenizer, tasks, "plain", **common)
    zero, _ = _train(tmp_path, tokenizer, tasks, "zero", protect_cores_from=str(tmp_path / "src"),
                     protect_method="ewc", protect_lambda=0.0, protect_ewc_form=form, **common)
    held, trainer = _train(tmp_path, tokenizer, tasks, "held", protect_cores_from=str(tmp_path / "src"),
                           protect_method="freeze_ewc", protect_lambda=10.0, protect_ewc_form=form, **common)
    moved = 0
    for n, p in held.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(zero.get_parameter(n), plain.get_parameter(n)), n
        if n in core and core.count(n):
            idx = core.indices(n)
            assert torch.equal(p.detach().flatten()[idx], theta_a[n].flatten()[idx]), n
        moved += int((p.detach() != theta_a[n]).sum())
    assert moved > 0 and max(_penalties(trainer)) > 0


def test_penalty_applies_once_per_optimizer_step_under_accumulation(tmp_path, tokenizer, tasks):
    """Plain SGD, constant lr, accumulation 2: the L2-SP loss form adds λ(θ − θ_A) once per step, so after two steps
    θ = θ_plain − lr·λ·(θ1 − θ_A) (θ1 = the weights after step 1, where the penalty was still 0); the decoupled form
    after one step is θ1 − lr·λ·(θ1 − θ_A)."""
    theta_a = _state(tiny_llama(tokenizer))
    _source(tmp_path, tiny_llama(tokenizer), importance=False)
    lr, lam = 0.05, 3.0
    common = dict(optim="sgd", lr_scheduler_type="constant", learning_rate=lr, weight_decay=0.0, max_grad_norm=0.0,
                  gradient_accumulation_steps=2)
    protect = dict(protect_cores_from=str(tmp_path / "src"), protect_method="l2sp", protect_lambda=lam)
    one, _ = _train(tmp_path, tokenizer, tasks, "one", max_steps=1, **common)
    two, _ = _train(tmp_path, tokenizer, tasks, "two", max_steps=2, **common)
    loss_form, trainer = _train(tmp_path, tokenizer, tasks, "loss", max_steps=2, **common, **protect)
    decoupled, _ = _train(tmp_path, tokenizer, tasks, "dec", max_steps=1, **common, **protect,
                          protect_ewc_form="decoupled")
    theta1 = _state(one)
    for n, p in loss_form.named_parameters():
        want = two.get_parameter(n).detach() - lr * lam * (theta1[n] - theta_a[n])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
        want = theta1[n] - lr * lam * (theta1[n] - theta_a[n])
        torch.testing.assert_close(decoupled.get_parameter(n).detach(), want, rtol=1e-5, atol=1e-7)
    # the logged value: λ/2 Σ (θ − θ_A)² at the weights each step starts from
    expected = 0.5 * lam * sum(float(((theta1[n] - theta_a[n]) ** 2).sum()) for n in theta1)
    assert _penalties(trainer) == [0.0, pytest.approx(expected, rel=1e-5)]


def test_protection_bad_input_stops_before_any_work(tmp_path, tokenizer, tasks):
    src = str(tmp_path / "src")
    with pytest.raises(DPIConfigError, match="protect_lambda=-1.0 must be a number >= 0"):
        dpi_args(tmp_path, protect_cores_from=src, protect_method="ewc", protect_lambda=-1.0)
    with pytest.raises(DPIConfigError, match="protect_method='freeze' has none"):
        dpi_args(tmp_path, protect_cores_from=src, protect_lambda=1.0)
    with pytest.raises(DPIConfigError, match="needs protect_lambda"):
        dpi_args(tmp_path, protect_cores_from=src, protect_method="l2sp")
    with pytest.raises(DPIConfigError, match="protect_cores_from, which is not set"):
        dpi_args(tmp_path, protect_method="ewc", protect_lambda=1.0)
    with pytest.raises(DPIConfigError, match="is not one of"):
        dpi_args(tmp_path, protect_cores_from=src, protect_method="soft", protect_lambda=1.0)
    with pytest.raises(DPIConfigError, match="nothing would be left"):
        dpi_args(tmp_path, protect_cores_from=src, protect_method="freeze_ewc", protect_lambda=1.0,
                 protect_ewc_scope="core")
    with pytest.raises(DPIConfigError, match="only used with protect_method"):
        dpi_args(tmp_path, protect_cores_from=src, protect_ewc_form="decoupled")
    model = tiny_llama(tokenizer)
    _source(tmp_path, model, importance=False)
    out = tmp_path / "never"
    with pytest.raises(DPIConfigError, match=r"no stored importance for \['old'\].*save_importance=True"):
        DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(out), protect_cores_from=src, protect_method="ewc",
                                        protect_lambda=1.0), train_dataset=tasks["rev"], processing_class=tokenizer)
    from peft import LoraConfig

    with pytest.raises(DPIConfigError, match="peft_config"):
        DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(out), protect_cores_from=src),
                   train_dataset=tasks["rev"], processing_class=tokenizer, peft_config=LoraConfig(r=4))
    assert not out.exists()  # nothing was written
    # l2sp needs no importance: the same source is accepted
    DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(out), protect_cores_from=src, protect_method="l2sp",
                                    protect_lambda=1.0), train_dataset=tasks["rev"], processing_class=tokenizer)


def test_ewc_in_dpi_stages_sums_the_protected_importances(tmp_path, tokenizer, tasks):
    """Several tasks: the anchor applies in every stage; two protected tasks sum their normalised importances."""
    from dpi_hf.artifacts import load_importance
    from dpi_hf.core.anchoring import normalise_importance
    from dpi_hf.trainer.ewc import anchor_weights

    model = tiny_llama(tokenizer)
    core = _source(tmp_path, model)
    g = torch.Generator().manual_seed(9)
    second = {n: torch.rand(p.shape, generator=g) * 7 for n, p in model.named_parameters()}
    save_cores({"old": core, "older": core}, tmp_path / "src" / "dpi" / "cores.safetensors", model=model)
    first = load_importance(tmp_path / "src")["old"]
    save_importance(tmp_path / "src", {"old": first, "older": second}, {"old": 4, "older": 2}, signal="fisher",
                    model=model)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "run"), protect_cores_from=str(tmp_path / "src"),
                    protect_method="ewc", protect_lambda=1.0, staging="given", stage_groups=[["rev"], ["upper"]],
                    max_steps=4)
    weights = anchor_weights(args, model, ["old", "older"])
    stored = load_importance(tmp_path / "src")
    for n in weights:
        want = normalise_importance(stored["old"])[n] + normalise_importance(stored["older"])[n]
        torch.testing.assert_close(weights[n], want)
    from transformers import TrainerCallback

    logged = []

    class Recorder(TrainerCallback):  # every phase's logs (each stage's own log_history starts empty)
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "protect_penalty" in logs:
                logged.append(logs["protect_penalty"])

    trainer = DPITrainer(model, args=args, train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]},
                         processing_class=tokenizer, callbacks=[Recorder()])
    trainer.train()
    assert len(logged) == 4 and logged[0] == 0.0 and min(logged[1:]) > 0  # every optimizer step of both stages
    stages = [r for r in trainer.phase_records if r.kind == "stage"]
    assert stages[0].frozen == 0  # ewc freezes nothing of the protected cores


def _torchrun(script, *args):
    """Run tests/scripts/SCRIPT in two processes with torchrun (gloo, CPU)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).parent / "scripts" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
def test_penalty_applies_once_per_optimizer_step_under_ddp(tmp_path, tokenizer):
    """Two DDP processes (gloo, CPU), plain SGD: the L2-SP loss-form gradient is applied once per step on every rank
    (θ2 = θ2_plain − lr·λ·(θ1 − θ_A)), the decoupled pull once after each step, and both ranks end with the same
    weights and log the same penalty."""
    from safetensors.torch import load_file

    theta_a = _state(tiny_llama(tokenizer))
    _source(tmp_path, tiny_llama(tokenizer), importance=False)
    lr, lam = 0.05, 3.0
    results = {}
    for name, extra in (("two", ["--steps", "2"]),  # plain: the weights after step 1 and step 2 of one run
                        ("l2sp", ["--steps", "2", "--method", "l2sp", "--lam", str(lam)]),
                        ("dec", ["--steps", "1", "--method", "l2sp", "--lam", str(lam), "--form", "decoupled"])):
        r = _torchrun("run_protect.py", str(tmp_path / name), str(tmp_path / "src"), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        ranks = [load_file(str(tmp_path / f"{name}.rank{i}.safetensors")) for i in range(2)]
        logs = [json.loads((tmp_path / f"{name}.rank{i}.json").read_text()) for i in range(2)]
        assert logs[0]["world_size"] == 2 and logs[0]["penalties"] == logs[1]["penalties"]
        for n in ranks[0]:
            assert torch.equal(ranks[0][n], ranks[1][n]), (name, n)
        results[name] = (ranks[0], logs[0]["penalties"])
    theta1, theta2 = load_file(str(tmp_path / "two.rank0.step1.safetensors")), results["two"][0]
    assert all(torch.equal(theta2[n], load_file(str(tmp_path / "two.rank0.step2.safetensors"))[n]) for n in theta2)
    for n, t in results["l2sp"][0].items():
        torch.testing.assert_close(t, theta2[n] - lr * lam * (theta1[n] - theta_a[n]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(results["dec"][0][n], theta1[n] - lr * lam * (theta1[n] - theta_a[n]), rtol=1e-5,
                                   atol=1e-7)
    expected = 0.5 * lam * sum(float(((theta1[n] - theta_a[n]) ** 2).sum()) for n in theta1)
    assert results["l2sp"][1] == [0.0, pytest.approx(expected, rel=1e-5)]


@pytest.mark.parametrize("method", ["l2sp", "ewc"])
def test_decoupled_pull_keeps_the_plans_frozen_cores_bit_exact(tmp_path, tokenizer, tasks, method):
    """In a multi-task run, stage k freezes the cores of earlier stages; the decoupled pull (after the optimizer step)
    must not move them towards θ_A: the frozen elements after stage 2 equal those after stage 1 bit for bit."""
    from safetensors.torch import load_file

    model = tiny_llama(tokenizer)
    _source(tmp_path, model)
    args = dpi_args(tmp_path, output_dir=str(tmp_path / "run"), protect_cores_from=str(tmp_path / "src"),
                    protect_method=method, protect_lambda=10.0, protect_ewc_form="decoupled", jaccard_threshold=1.0,
                    max_steps=4, save_stage_models=True)
    trainer = DPITrainer(model, args=args, train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]},
                         processing_class=tokenizer)
    trainer.train()
    assert len(trainer.plan.stages) == 2
    frozen = trainer.plan.frozen_before(1)
    assert frozen is not None and frozen.count() > 0
    before, after = (load_file(str(tmp_path / "run" / f"stage-{k}" / "model.safetensors")) for k in (0, 1))
    for name in frozen.names():
        idx = frozen.indices(name)
        a, b = before[name].reshape(-1)[idx], after[name].reshape(-1)[idx]
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


@pytest.mark.parametrize("engine", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_anchor_under_a_sharding_engine_is_refused_when_the_trainer_is_built(tmp_path, tokenizer, tasks, monkeypatch,
                                                                              engine):
    """EWC / L2-SP keep whole θ_A and F tensors: under FSDP or DeepSpeed the trainer refuses them at construction
    (a single dataset and a multi-task run alike), not when a stage starts after the probes."""
    from transformers import Trainer

    original = Trainer.__init__

    def sharded_init(self, *args, **kwargs):  # what accelerate sets under an FSDP / DeepSpeed launch config
        original(self, *args, **kwargs)
        setattr(self, engine, True)

    model = tiny_llama(tokenizer)
    _source(tmp_path, model)
    monkeypatch.setattr(Trainer, "__init__", sharded_init)
    protect = dict(protect_cores_from=str(tmp_path / "src"), protect_method="l2sp", protect_lambda=1.0)
    with pytest.raises(DPIConfigError, match="protect_method='l2sp' is not supported under FSDP or DeepSpeed"):
        DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(tmp_path / "one"), **protect),
                   train_dataset=tasks["rev"], processing_class=tokenizer)
    if engine == "is_fsdp_enabled":  # (a multi-task run under DeepSpeed has its own refusal first)
        with pytest.raises(DPIConfigError, match="not supported under FSDP or DeepSpeed"):
            DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(tmp_path / "multi"), **protect),
                       train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]}, processing_class=tokenizer)
    assert not (tmp_path / "one" / "dpi").exists() and not (tmp_path / "multi" / "dpi").exists()
    if engine == "is_fsdp_enabled":  # freezing alone is accepted under FSDP (the freezer works on local shards)
        DPITrainer(model, args=dpi_args(tmp_path, output_dir=str(tmp_path / "freeze"),
                                        protect_cores_from=str(tmp_path / "src")),
                   train_dataset={"rev": tasks["rev"], "upper": tasks["upper"]}, processing_class=tokenizer)
