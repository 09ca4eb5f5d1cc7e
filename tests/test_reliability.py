"""Importance signals, split-half reliability and planning on the reliability-corrected overlap."""

import json
import math
import random

import pytest
import torch
from datasets import Dataset

from conftest import dpi_args, tiny_llama
from dpi_hf import CoreMask, DPIConfig, DPIConfigError, DPITrainer, plan_stages
from dpi_hf.core.reliability import random_jaccard, reliability_report
from dpi_hf.core.signals import ImportanceAccumulator, threshold_ties, tie_warning

torch.set_num_threads(1)
SHAPES = {"w": (10,)}


def mask(*idx):
    return CoreMask.from_indices({"w": torch.tensor(sorted(idx), dtype=torch.int64)}, SHAPES)


# ---------------------------------------------------------------------------------------------------- engine
def test_reliability_and_corrected_overlap_by_hand():
    # a: halves {0,1,2,3} / {0,1,2,4} -> r_a = 3/5; b: halves {0,1,5,6} / {0,1,5,7} -> r_b = 3/5
    halves = {"a": (mask(0, 1, 2, 3), mask(0, 1, 2, 4)), "b": (mask(0, 1, 5, 6), mask(0, 1, 5, 7))}
    rep = reliability_report(halves, core_fraction=0.4)
    assert rep.reliability == {"a": pytest.approx(0.6), "b": pytest.approx(0.6)}
    # the four cross pairs: {0123}~{0156} = 2/6, {0123}~{0157} = 2/6, {0124}~{0156} = 2/6, {0124}~{0157} = 2/6
    h = 2 / 6
    assert rep.half_jaccard == [[pytest.approx(0.6), pytest.approx(h)], [pytest.approx(h), pytest.approx(0.6)]]
    assert rep.corrected_jaccard[0][1] == pytest.approx(h / math.sqrt(0.6 * 0.6))
    assert rep.corrected_jaccard[0][0] == 1.0
    assert rep.random_level == pytest.approx(0.4 / 1.6) == random_jaccard(0.4)
    # a is reliable against b (0.6 >= 1.2 * 1/3) but not against the random level (0.6 < 2 * 0.25 is False)
    assert rep.unreliable == {}


def test_corrected_overlap_is_clipped_and_unreliable_tasks_are_named():
    halves = {"a": (mask(0, 1), mask(0, 2)), "b": (mask(0, 1), mask(0, 2))}  # r = 1/3, H = (1 + 1/3 + 1/3 + 1)/4
    rep = reliability_report(halves, core_fraction=0.2)
    assert rep.corrected_jaccard[0][1] == 1.0  # (2/3) / (1/3) clipped to 1
    assert set(rep.unreliable) == {"a", "b"} and "'b'" in rep.unreliable["a"]
    noise = reliability_report({"a": (mask(0), mask(1)), "b": (mask(2), mask(3))}, core_fraction=0.1)
    assert noise.reliability == {"a": 0.0, "b": 0.0} and noise.corrected_jaccard[0][1] == 0.0
    assert "random level" in noise.unreliable["a"]
    assert "core_signal='fisher'" in noise.unreliable["a"] and "core_signal='fisher'" in rep.unreliable["a"]
    # cores already from a gradient signal: the fix is more probe data, not the signal they already use
    for signal in ("fisher", "gradsum"):
        for r in (reliability_report(halves, core_fraction=0.2, signal=signal),
                  reliability_report({"a": (mask(0), mask(1)), "b": (mask(2), mask(3))}, 0.1, signal=signal)):
            assert all("core_signal" not in text and "probe_steps" in text for text in r.unreliable.values())


def test_plan_groups_on_the_chosen_matrix():
    halves = {"a": (mask(0, 1, 2, 3), mask(0, 1, 2, 4)), "b": (mask(0, 1, 5, 6), mask(0, 1, 5, 7)),
              "c": (mask(8, 9), mask(8, 9))}
    rep = reliability_report(halves, core_fraction=0.4)
    cores = {"a": mask(0, 1, 2, 3), "b": mask(0, 1, 5, 6), "c": mask(8, 9)}
    raw = plan_stages(cores, 0.5, reliability=rep, overlap="raw")  # raw J(a, b) = 2/6 < 0.5
    assert raw.groups == [["a"], ["b"], ["c"]] and raw.reliability is rep
    corrected = plan_stages(cores, 0.5, reliability=rep, overlap="corrected")  # (1/3)/0.6 = 0.56 >= 0.5
    assert corrected.groups == [["a", "b"], ["c"]]
    d = json.loads(corrected.to_json())
    assert d["overlap"] == "corrected" and d["reliability"]["c"] == 1.0
    assert {"random_level", "half_jaccard", "corrected_jaccard"} <= set(d)
    back = type(corrected).from_json(corrected.to_json())
    assert back.reliability.corrected_jaccard == rep.corrected_jaccard and back.overlap == "corrected"
    assert "split-half reliability" in corrected.describe()
    # a task order other than the report's is reordered, not mixed up
    reordered = plan_stages(cores, 0.5, tasks=["c", "b", "a"], reliability=rep, overlap="corrected")
    assert reordered.groups == [["c"], ["b", "a"]]
    # a report of more tasks (e.g. from masks_from) is restricted and reordered to the plan's tasks, raw or not
    sub = plan_stages({"b": cores["b"], "a": cores["a"]}, 0.5, reliability=rep, overlap="raw")
    assert sub.reliability.tasks == ["b", "a"] and sub.reliability.half_jaccard[0][0] == rep.half_jaccard[1][1]
    with pytest.raises(DPIConfigError, match="split_half"):
        plan_stages(cores, 0.5, overlap="corrected")
    with pytest.raises(DPIConfigError, match="overlap"):
        plan_stages(cores, 0.5, overlap="pooled")


def test_accumulators_match_a_hand_computation():
    lin = torch.nn.Linear(3, 2)
    fisher, gradsum = ImportanceAccumulator(lin, "fisher"), ImportanceAccumulator(lin, "gradsum", exclude=["bias"])
    grads = []
    for step in range(3):
        lin.zero_grad()
        lin(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).sum().backward()
        grads.append(lin.weight.grad.clone())
        fisher.accumulate()
        gradsum.accumulate()
    assert torch.allclose(fisher.importance()["weight"], sum(g * g for g in grads))
    assert torch.allclose(gradsum.importance()["weight"], sum(grads).abs())
    assert list(gradsum.importance()) == ["weight"] and fisher.nbytes == 4 * (6 + 2) and fisher.steps == 3
    with pytest.raises(DPIConfigError, match="core_signal"):
        ImportanceAccumulator(lin, "hessian")
    with pytest.raises(DPIConfigError, match="no trainable parameter"):
        ImportanceAccumulator(lin, "fisher", include=["nothing"])


def test_threshold_tie_warning():
    imp = {"w": torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    core = mask(0, 1, 2)  # must take one exact zero
    report = threshold_ties(imp, core)
    assert report == {"threshold": 0.0, "tied": 8, "tied_selected": 1, "core_size": 3}
    assert "exact zeros" in tie_warning(report, "core of 't'")
    block = {"w": torch.tensor([9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5])}
    assert "shared by 7 elements" in tie_warning(threshold_ties(block, mask(0, 1, 2, 3)), "x")
    assert tie_warning(threshold_ties(block, mask(0)), "x") is None


# ---------------------------------------------------------------------------------------------------- trainer
def _text_task(words, n, seed):
    rng = random.Random(seed)
    return Dataset.from_list([{"text": " ".join(rng.choice(words) for _ in range(12))} for _ in range(n)])


NUMBERS = "one two three four five six seven eight nine ten".split()
CAPS = "RED BLUE GREEN CAT DOG MAT HELLO WORLD".split()


def test_planted_structure_tasks_on_disjoint_embedding_rows(tmp_path, tokenizer):
    """Two tasks on disjoint vocabularies use disjoint embedding rows: reliable cores, no corrected overlap,
    separate stages; two samples of one task are indistinguishable and land together."""
    tasks = {"num": _text_task(NUMBERS, 32, 1), "num_again": _text_task(NUMBERS, 32, 2),
             "caps": _text_task(CAPS, 32, 3)}
    args = dpi_args(tmp_path, probe_steps=4, core_fraction=0.02, core_include=["embed_tokens"])
    model = tiny_llama(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = DPITrainer(model, args=args, train_dataset=tasks, processing_class=tokenizer).probe()
    rel = plan.reliability
    i = {t: k for k, t in enumerate(plan.tasks)}
    for t in plan.tasks:
        assert rel.reliability[t] > 5 * rel.random_level, t
    assert rel.corrected_jaccard[i["num"]][i["caps"]] < 0.05
    assert rel.corrected_jaccard[i["num_again"]][i["caps"]] < 0.05
    assert rel.corrected_jaccard[i["num"]][i["num_again"]] > 0.8
    assert plan.stages == [["num", "num_again"], ["caps"]]
    # probe() trains no stage and leaves the model as it was
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    out = tmp_path / "out"
    record = json.loads((out / "dpi" / "plan.json").read_text())
    assert record["reliability"] == rel.reliability and record["overlap"] == "corrected"
    assert record["corrected_jaccard"] == rel.corrected_jaccard and record["random_level"] == rel.random_level
    # one pass per task (the halves alternate step by step): 3 probes of 4 steps of 4 rows
    cost = record["probe_cost"]
    assert {k: cost[k] for k in ("phases", "steps", "examples")} == {"phases": 3, "steps": 12, "examples": 48}
    assert cost["tokens"] > 48 * 12 and record["probe_updates_weights"] is False  # no-step Σg²: the default
    assert record["core_signal"] == "fisher" and record["probe_weight_decay"] == 0.0
    assert (out / "dpi" / "overlap.png").stat().st_size > 5000
    assert not any(out.glob("stage-*")) and not (out / "_dpi_runs" / "stage-0").exists()
    card = (out / "README.md").read_text()
    assert "reliability:" in card and "Core reliability" in card
    # masks_from reuses the probed cores and their reliability report: no probe runs, same plan
    reuse = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path / "reuse", probe_steps=4, core_fraction=0.02,
                                                            core_include=["embed_tokens"], masks_from=str(out)),
                       train_dataset=tasks, processing_class=tokenizer)
    reuse.train()
    assert reuse.plan.stages == plan.stages and not any(r.kind == "probe" for r in reuse.phase_records)
    assert reuse.plan.reliability.corrected_jaccard == rel.corrected_jaccard


@pytest.mark.parametrize("signal", ["update", "gradsum"])
def test_other_signals_run_end_to_end(tmp_path, tokenizer, tasks, signal):
    tr = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, core_signal=signal, max_steps=3),
                    train_dataset=tasks, processing_class=tokenizer)
    tr.train()
    assert all(c.count() == tr.plan.core_counts[t] > 0 for t, c in tr.cores.items())
    assert json.loads((tmp_path / "out" / "dpi" / "plan.json").read_text())["core_signal"] == signal


def test_probe_only_settings_do_not_leak_into_stages(tmp_path, tokenizer, tasks):
    from pathlib import Path

    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.append((Path(args.output_dir).name, args.weight_decay, args.train_batch_size, str(args.optim),
                         str(args.lr_scheduler_type)))

    args = dpi_args(tmp_path, probe_reliability="none", overlap="raw", weight_decay=0.1, probe_batch_size=2,
                    probe_optim="sgd", max_steps=3, lr_scheduler_type="linear")
    tr = DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks, processing_class=tokenizer,
                    callbacks=[Record()])
    tr.train()
    probes = [s for s in seen if s[0].startswith("probe")]
    stages = [s for s in seen if s[0].startswith("stage")]
    assert len(probes) == 3 and all(s[1:] == (0.0, 2, "sgd", "constant") for s in probes), probes
    assert stages and all(s[1] == 0.1 and s[2] == 4 and "sgd" not in s[3].lower() and "linear" in s[4].lower() for s in stages)
    assert tr.args.weight_decay == 0.1 and tr.args.output_dir == str(tmp_path / "out")  # never edited
    assert [r.examples for r in tr.phase_records if r.kind == "probe"] == [3 * 2] * 3


def test_bad_input_fails_before_training(tmp_path, tokenizer, tasks):
    with pytest.raises(DPIConfigError, match="core_signal='hessian'"):
        dpi_args(tmp_path, core_signal="hessian")
    with pytest.raises(DPIConfigError, match="probe_reliability"):
        dpi_args(tmp_path, probe_reliability="bootstrap")
    with pytest.raises(DPIConfigError, match="overlap='corrected' needs probe_reliability='split_half'"):
        dpi_args(tmp_path, probe_reliability="none")
    with pytest.raises(DPIConfigError, match="fp16 loss scaling"):
        dpi_args(tmp_path, fp16=True)
    tiny = {t: ds.select(range(3)) for t, ds in tasks.items()}
    with pytest.raises(DPIConfigError, match="at least 2 rows per half"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, max_steps=3), train_dataset=tiny,
                   processing_class=tokenizer)
    with pytest.raises(DPIConfigError, match="smaller than the number of stages this run can have"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, max_steps=2), train_dataset=tasks,
                   processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


def test_strict_reliability_stops_before_any_stage(tmp_path, tokenizer):
    # two samples of one task: each core is no more its own than the other's -> unreliable by the rule
    tasks = {"num": _text_task(NUMBERS, 32, 1), "num_again": _text_task(NUMBERS, 32, 2)}
    args = dpi_args(tmp_path, probe_steps=4, core_fraction=0.02, core_include=["embed_tokens"],
                    strict_reliability=True, max_steps=3)
    with pytest.raises(DPIConfigError, match="strict_reliability.*'num'.*No stage was trained"):
        DPITrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks, processing_class=tokenizer).train()
    assert not (tmp_path / "out" / "_dpi_runs" / "stage-0").exists()


def test_core_probe_callback_fisher_in_plain_trainer(tmp_path, tokenizer, tasks):
    from trl import SFTConfig, SFTTrainer

    from dpi_hf import CoreProbeCallback

    probe = CoreProbeCallback(core_fraction=0.05, signal="fisher", task_name="add", keep_importance=True)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=64, save_strategy="no",
                     disable_tqdm=True, dataset_num_proc=None, learning_rate=1e-2)
    SFTTrainer(tiny_llama(tokenizer), args=args, train_dataset=tasks["add"], processing_class=tokenizer,
               callbacks=[probe]).train()
    assert probe.core.count() == int(0.05 * probe.core.numel()) and probe.ties["core_size"] == probe.core.count()
    # the core is exactly the top of the accumulated squared gradients
    flat = torch.cat([probe.importance[k].reshape(-1) for k in probe.core.names()])
    chosen = torch.cat([probe.core.dense(k).reshape(-1) for k in probe.core.names()])
    assert flat[chosen].min() >= flat[~chosen].max()


def test_config_defaults_are_the_reliable_ones():
    a = DPIConfig("x", use_cpu=True, bf16=False, report_to=[])
    assert (a.core_signal, a.probe_reliability, a.overlap, a.probe_weight_decay) == \
        ("fisher", "split_half", "corrected", 0.0)
    # measured: no-step Σg² probes, τ = 0.7 on the corrected scale
    assert a.probe_updates_weights is False and a.jaccard_threshold == 0.7


def test_pure_bf16_updates_warn_about_zeros(caplog):
    """Pure-bf16 training rounds small updates to 0; a core that must take zeros says so."""
    import logging

    from dpi_hf import CoreProbeCallback

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    probe = CoreProbeCallback(core_fraction=0.05, signal="update",
                              reference={n: p.detach().clone() for n, p in lin.named_parameters()})
    with torch.no_grad():  # an update that survives bf16 rounding on 1% of the elements only
        lin.weight.view(-1)[:40] += 1.0
    with caplog.at_level(logging.WARNING, logger="dpi_hf"):
        core = probe.select(lin)
    assert core.count() == int(0.05 * (64 * 64 + 64))
    assert probe.ties["threshold"] == 0.0 and probe.ties["tied_selected"] == core.count() - 40
    assert "exact zeros" in caplog.text and "float32" in caplog.text
