"""One-pass split-half accumulators, the pooled core's Spearman–Brown reliability, and affinity planning (engine)."""

import json
import random

import pytest
import torch

from dpi_hf import CoreMask, DPIConfigError, StagePlan, plan_stages
from dpi_hf.core.affinity import AffinityReport, affinity_report, gradient_dot
from dpi_hf.core.reliability import pooled_reliability, random_jaccard
from dpi_hf.core.selection import select_core
from dpi_hf.core.signals import ImportanceAccumulator

torch.set_num_threads(1)


def _steps(lin, n):
    grads = []
    for step in range(n):
        lin.zero_grad()
        lin(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).sum().backward()
        grads.append({"weight": lin.weight.grad.clone(), "bias": lin.bias.grad.clone()})
    return grads


def test_parts_accumulate_separately_and_pool_on_read():
    lin = torch.nn.Linear(3, 2)
    fisher = ImportanceAccumulator(lin, "fisher", parts=2, keep_signed_sum=True)
    gradsum = ImportanceAccumulator(lin, "gradsum", parts=2, keep_signed_sum=True)
    grads = []
    for step, g in enumerate(_steps(lin, 5)):
        lin.weight.grad, lin.bias.grad = g["weight"], g["bias"]
        fisher.accumulate(step % 2)
        gradsum.accumulate(step % 2)
        grads.append(g["weight"])
    even, odd = grads[0::2], grads[1::2]
    assert torch.allclose(fisher.importance(0)["weight"], sum(g * g for g in even))
    assert torch.allclose(fisher.importance(1)["weight"], sum(g * g for g in odd))
    assert torch.allclose(fisher.importance()["weight"], sum(g * g for g in grads))  # pooled = the sum of the parts
    assert torch.allclose(fisher.signed_sum()["weight"], sum(grads))
    # gradsum: a part is |Σ g| of its steps; pooled is |Σ g| over all steps, not the sum of the parts' magnitudes
    assert torch.allclose(gradsum.importance(1)["weight"], sum(odd).abs())
    assert torch.allclose(gradsum.importance()["weight"], sum(grads).abs())
    assert torch.allclose(gradsum.signed_sum()["weight"], sum(grads))
    assert fisher.part_steps == [3, 2] and fisher.steps == 5
    assert fisher.nbytes == gradsum.nbytes == 3 * 4 * 8  # two parts and the signed sum
    with pytest.raises(DPIConfigError, match="part"):
        fisher.accumulate(2)
    with pytest.raises(DPIConfigError, match="keep_signed_sum"):
        ImportanceAccumulator(lin, "fisher").signed_sum()
    with pytest.raises(DPIConfigError, match="parts"):
        ImportanceAccumulator(lin, "fisher", parts=0)


def test_pooled_reliability_is_spearman_brown_on_phi():
    p = 0.01
    r = 0.4
    o = 2 * r / 1.4
    phi = (o - p) / (1 - p)
    phi2 = 2 * phi / (1 + phi)
    o2 = p + (1 - p) * phi2
    assert pooled_reliability(r, p) == pytest.approx(o2 / (2 - o2))
    assert r < pooled_reliability(r, p) < 1
    assert pooled_reliability(1.0, p) == pytest.approx(1.0)
    level = random_jaccard(p)
    assert pooled_reliability(level, p) == pytest.approx(level)  # chance stays chance
    assert pooled_reliability(0.0, p) == 0.0
    # applying it twice is the same as factor 4 (Spearman–Brown composes)
    assert pooled_reliability(pooled_reliability(r, p), p) == pytest.approx(pooled_reliability(r, p, factor=4))


def test_pooled_reliability_matches_simulated_cores():
    # Σ g² of batch gradients g = μ + noise, elements of varying mean μ; cores of n and 2n batches from new data
    gen = torch.Generator().manual_seed(0)
    n_el, p, n = 20000, 0.05, 4
    mean = torch.randn(n_el, generator=gen) * 0.6

    def core(batches):
        imp = sum((mean + torch.randn(n_el, generator=gen)) ** 2 for _ in range(batches))
        return select_core({"w": imp}, p)

    halves = [core(n).jaccard(core(n)) for _ in range(4)]
    pooled = [core(2 * n).jaccard(core(2 * n)) for _ in range(4)]
    r_n, r_2n = sum(halves) / 4, sum(pooled) / 4
    assert pooled_reliability(r_n, p) == pytest.approx(r_2n, abs=0.05)


def test_affinity_by_hand_and_round_trip():
    # S_a = 2·(1, 0), S_b = 2·(0.5, 0.5), S_c = 2·(−1, 0): two steps each, so ḡ = S / 2
    dots = [[4.0, 2.0, -4.0], [2.0, 2.0, -2.0], [-4.0, -2.0, 4.0]]
    rep = affinity_report(dots, ["a", "b", "c"], {"a": 2, "b": 2, "c": 2}, {"a": 1.0, "b": 2.0, "c": 0.5}, 0.1)
    assert rep.gradient_dots[0][1] == pytest.approx(0.5)
    assert rep.affinity[0][1] == pytest.approx(0.1 * 0.5 / 2.0)  # a's step on b's loss: η ḡa·ḡb / L_b
    assert rep.affinity[1][0] == pytest.approx(0.1 * 0.5 / 1.0)
    assert rep.symmetric[0][1] == pytest.approx((0.025 + 0.05) / 2)
    assert rep.symmetric[0][2] < 0
    again = AffinityReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert sum(again.symmetric, []) == pytest.approx(sum(rep.symmetric, []))
    sub = rep.reorder(["c", "a"])
    assert sub.symmetric[0][1] == pytest.approx(rep.symmetric[2][0])
    with pytest.raises(DPIConfigError, match="loss"):
        affinity_report(dots, ["a", "b", "c"], {"a": 2, "b": 2, "c": 2}, {"a": 0.0, "b": 1.0, "c": 1.0}, 0.1)
    with pytest.raises(DPIConfigError, match="3x3"):
        affinity_report(dots[:2], ["a", "b", "c"], {}, {}, 0.1)


def test_gradient_dot_is_float64_over_every_tensor():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[3.0]])}
    b = {"x": torch.tensor([0.5, -1.0]), "y": torch.tensor([[2.0]])}
    assert gradient_dot(a, b) == pytest.approx(0.5 - 2.0 + 6.0)
    with pytest.raises(DPIConfigError, match="different parameters"):
        gradient_dot(a, {"x": b["x"]})


def _random_cores(names, seed=0):
    rng = random.Random(seed)
    shapes = {"w": (50,)}
    return {t: CoreMask.from_indices({"w": torch.tensor(sorted(rng.sample(range(50), 5)))}, shapes) for t in names}


def test_plan_on_affinity_groups_agreeing_tasks_and_splits_conflicting_ones():
    tasks = ["a", "a2", "b"]
    # a and a2 point the same way, b against both
    dots = [[4.0, 3.0, -2.0], [3.0, 4.0, -2.5], [-2.0, -2.5, 4.0]]
    rep = affinity_report(dots, tasks, dict.fromkeys(tasks, 1), dict.fromkeys(tasks, 1.0), 1e-3)
    cores = _random_cores(tasks)
    plan = plan_stages(cores, 0.1, overlap="affinity", affinity=rep)
    assert plan.groups == [["a", "a2"], ["b"]] and plan.stages == [["a", "a2"], ["b"]]
    assert plan.frozen_counts[1] == CoreMask.union_all([cores["a"], cores["a2"]]).count()
    # a threshold above the a~a2 affinity splits them too
    assert plan_stages(cores, 0.1, overlap="affinity", affinity=rep, affinity_threshold=0.01).groups == \
        [["a"], ["a2"], ["b"]]
    text = plan.describe()
    assert "task affinity" in text and "groups (affinity > 0)" in text
    again = StagePlan.from_json(plan.to_json())
    assert again.overlap == "affinity" and sum(again.affinity.symmetric, []) == pytest.approx(sum(rep.symmetric, []))
    # the affinity report travels with any plan, so a corrected-overlap run can be re-planned on affinity
    assert plan_stages(cores, overlap="raw").jaccard_threshold == 0.1  # τ's default follows the overlap's scale
    raw = plan_stages(cores, 0.0, overlap="raw", affinity=rep)
    assert raw.groups == [tasks] and StagePlan.from_json(raw.to_json()).affinity is not None
    with pytest.raises(DPIConfigError, match="probe_affinity"):
        plan_stages(cores, 0.1, overlap="affinity")
    with pytest.raises(DPIConfigError, match="affinity_threshold"):
        plan_stages(cores, 0.1, overlap="affinity", affinity=rep, affinity_threshold=float("nan"))


# ---------------------------------------------------------------------------------------------------- trainer
def _answer_task(answer: str, n: int, seed: int):
    """Prompts "say w1 w2 w3" (random words, seeded), each answered with the same ``answer``."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = "the cat dog sat on mat red blue green".split()
    return Dataset.from_list([{"prompt": [{"role": "user", "content": "say " + " ".join(rng.choice(words)
                                                                                        for _ in range(3))}],
                               "completion": [{"role": "assistant", "content": answer}]} for _ in range(n)])


def _format_learned_model(tokenizer, tmp_path, rows):
    """A tiny model trained on the mixture of both answers, so that it has learned the answer's format (the end of
    turn) and hesitates between the two answers: there the two answers' gradients point against each other."""
    from trl import SFTConfig, SFTTrainer

    from conftest import tiny_llama

    model = tiny_llama(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path / "warm"), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_length=64, seed=0, dataset_num_proc=None, disable_tqdm=True, logging_steps=40)
    SFTTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer).train()
    return model


def test_affinity_splits_conflicting_tasks_and_keeps_agreeing_ones_end_to_end(tmp_path, tokenizer):
    """Same prompts, different answers: the two tasks conflict (a step on one raises the other's loss) and train in
    different stages; a second task with the same answer agrees with the first and shares its stage. Then the run
    re-plans from its saved record (dpi-hf plan --overlap affinity) and masks_from reuses it without probing."""
    from datasets import concatenate_datasets

    from conftest import dpi_args
    from dpi_hf import DPITrainer
    from dpi_hf.cli import main as cli_main

    tasks = {"cat": _answer_task("cat", 32, 1), "cat_again": _answer_task("cat", 32, 2),
             "dog": _answer_task("dog", 32, 1)}  # dog: the same prompts as cat, the other answer
    model = _format_learned_model(tokenizer, tmp_path, concatenate_datasets([tasks["cat"], tasks["dog"]]))
    args = dpi_args(tmp_path, overlap="affinity", probe_steps=4, max_steps=4, learning_rate=1e-3)
    assert args.probe_affinity is True and args.probe_updates_weights is False  # both resolved from the defaults
    tr = DPITrainer(model, args=args, train_dataset=tasks, processing_class=tokenizer)
    tr.train()
    aff = tr.plan.affinity
    i = {t: k for k, t in enumerate(aff.tasks)}
    assert aff.symmetric[i["cat"]][i["dog"]] < 0 and aff.symmetric[i["cat_again"]][i["dog"]] < 0
    assert aff.symmetric[i["cat"]][i["cat_again"]] > 0
    assert tr.plan.groups == [["cat", "cat_again"], ["dog"]] and len(tr.plan.stages) == 2
    out = tmp_path / "out"
    record = json.loads((out / "dpi" / "plan.json").read_text())
    assert record["overlap"] == "affinity" and record["affinity"]["learning_rate"] == 1e-3
    assert record["affinity"]["steps"] == {"cat": 4, "cat_again": 4, "dog": 4}
    assert not list((out / "_dpi_runs" / "probes").glob("*.gradient.safetensors"))  # deleted once the dots are in
    # re-plan without probing, on another overlap and back
    assert cli_main(["plan", str(out), "--overlap", "corrected", "--jaccard-threshold", "0"]) == 0
    assert cli_main(["plan", str(out), "--overlap", "affinity", "--save", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["groups"] == [["cat", "cat_again"], ["dog"]]
    # masks_from: the affinity comes with the masks, no probe runs
    reuse = DPITrainer(tiny_llama_like(tokenizer), args=dpi_args(tmp_path / "reuse", overlap="affinity", max_steps=3,
                                                                 masks_from=str(out), allow_mask_mismatch=True),
                       train_dataset=tasks, processing_class=tokenizer)
    reuse.train()
    assert reuse.plan.groups == tr.plan.groups and not any(r.kind == "probe" for r in reuse.phase_records)


def tiny_llama_like(tokenizer):
    from conftest import tiny_llama

    return tiny_llama(tokenizer)


def test_alternating_halves_sampler_keeps_the_halves_apart():
    from dpi_hf.trainer.multitask import AlternatingHalvesSampler

    sampler = AlternatingHalvesSampler(5, 7, block=2, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 2 * 4 * 2  # 2·⌈7/2⌉ blocks of 2 rows
    for order in (first, second):
        blocks = [order[k:k + 2] for k in range(0, len(order), 2)]
        assert all(all(i < 5 for i in b) for b in blocks[0::2])  # even steps: half 1 only
        assert all(all(5 <= i < 12 for i in b) for b in blocks[1::2])  # odd steps: half 2 only
        assert set(order[1::4] + order[0::4]) == set(range(5))  # every row of half 1 is read
        assert set(i for b in blocks[1::2] for i in b) == set(range(5, 12))
    assert first != second  # each epoch draws a new order


def test_one_stage_note_only_for_dpi_plans_of_one_stage():
    from dpi_hf.core.planning import ONE_STAGE_NOTE, plan_from_groups

    cores = _random_cores(["a", "b"])
    one = plan_stages(cores, 0.0)
    assert one.is_multitask and ONE_STAGE_NOTE in one.describe()
    two = plan_stages(cores, 1.0)
    assert not two.is_multitask and ONE_STAGE_NOTE not in two.describe()
    baseline = plan_from_groups(cores, [["a", "b"]], stage_order="multitask")  # the baseline itself: nothing to say
    assert not baseline.is_multitask and ONE_STAGE_NOTE not in baseline.describe()
    assert not plan_stages({"a": cores["a"]}, 0.0).is_multitask  # one task: no mixture to speak of


def test_config_defaults_resolve_by_scale_and_signal(tmp_path):
    """τ's default follows the overlap's scale (0.7 corrected, measured; 0.1 raw, the paper's); no-step Σg² probes
    unless the signal or the fusion needs steps; probe_affinity when the overlap is affinity. Resolved values are not
    "set" DPI fields: a one-dataset run stays plain SFT."""
    from conftest import dpi_args
    from dpi_hf.trainer.run_state import dpi_fields_changed

    a = dpi_args(tmp_path, jaccard_threshold=None)
    assert a.jaccard_threshold == 0.7 and a.probe_updates_weights is False and a.probe_affinity is False
    assert dpi_args(tmp_path, jaccard_threshold=None, overlap="raw").jaccard_threshold == 0.1
    assert dpi_args(tmp_path, core_signal="update", overlap="raw").probe_updates_weights is True
    assert dpi_args(tmp_path, fusion="cpi").probe_updates_weights is True
    assert dpi_args(tmp_path, overlap="affinity").probe_affinity is True
    from dpi_hf import DPIConfig

    plain = DPIConfig(str(tmp_path / "plain"), use_cpu=True, bf16=False, report_to=[])
    assert dpi_fields_changed(plain) == []
    with pytest.raises(DPIConfigError, match="probe_affinity"):
        dpi_args(tmp_path, overlap="affinity", probe_affinity=False)
    with pytest.raises(DPIConfigError, match="probe_affinity"):
        dpi_args(tmp_path, core_signal="update", probe_affinity=True, overlap="raw")
    with pytest.raises(DPIConfigError, match="affinity_threshold"):
        dpi_args(tmp_path, affinity_threshold="high")
    with pytest.raises(DPIConfigError, match="second half without a step"):
        dpi_args(tmp_path, probe_steps=1)
    assert dpi_args(tmp_path, probe_steps=1, probe_reliability="none", overlap="raw").probe_steps == 1
