"""The comparison runner end to end on a tiny random Llama: four methods, same budget, tables, plots, sweep, CLI."""

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURE_DATA, tiny_llama
from dpi_hf.cli.compare import add_compare_parser, compare_command
from dpi_hf.cli.sweep import add_sweep_parser
from dpi_hf.compare import (
    DEFAULT_METHODS,
    METHODS,
    EvalSettings,
    load_compare_recipe,
    run_comparison,
    run_sweep,
)
from dpi_hf.core.errors import DPIConfigError

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS, PROBE_STEPS = 4, 6, 2
TRAINING = dict(per_device_train_batch_size=BATCH, learning_rate=1e-2, max_steps=STEPS, probe_steps=PROBE_STEPS,
                core_fraction=0.05, jaccard_threshold=0.3, logging_steps=1, use_cpu=True, bf16=False,
                activation_checkpointing=False, max_length=256, dataset_num_proc=None, disable_tqdm=True,
                # the paper's probe (one per task, |θ−θ0|, raw overlap): these tests check the harness, not the signal
                core_signal="update", probe_reliability="none", overlap="raw")
EVAL = dict(metrics={"code": "codebleu", "chat": "rougeL_proxy"}, metric_samples=2, max_new_tokens=6,
            batch_size=4, forgetting="nll")
GROUPS = [["gsm8k", "logiqa"], ["code", "chat"]]
PAPER_AND_CPI = [*DEFAULT_METHODS, "cpi"]  # the module fixture's methods; the others have their own test


def _task_files(tmp_path: Path, n: int = 13) -> list[dict]:
    """Four tiny tasks in the formats of the real data files (GSM8K jsonl, LogiQA txt, Alpaca json x2).

    ``n`` is deliberately not a multiple of the batch size: with a short last batch a method could see fewer
    examples than another, which the runner must prevent.
    """
    rng = random.Random(0)
    gsm = [{"question": f"what is {a} plus {b}", "answer": f"{a} plus {b} is {a + b}\n#### {a + b}"}
           for a, b in ((rng.randrange(20), rng.randrange(9)) for _ in range(n))]
    (tmp_path / "gsm.jsonl").write_text("\n".join(json.dumps(r) for r in gsm) + "\n")
    blocks = []
    for i in range(n):
        letter = "abcd"[i % 4]
        blocks += ["", letter, f"the cat sat on mat {i}", "what is the answer",
                   "A. red cat", "B. blue dog", "C. green mat", "D. hello world"]
    (tmp_path / "logiqa.txt").write_text("\n".join(blocks) + "\n")
    code = [{"instruction": f"write a function that adds {i}", "input": "",
             "output": f"def add(x):\n    return x + {i}"} for i in range(n)]
    (tmp_path / "code.json").write_text(json.dumps(code))
    chat = [{"instruction": f"say hello {i}", "input": "", "output": f"hello world {i}"} for i in range(n)]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    common = dict(eval_samples=3, seed=0)
    return [dict(name="gsm8k", source="gsm8k_jsonl", path=str(tmp_path / "gsm.jsonl"), **common),
            dict(name="logiqa", source="logiqa_txt", path=str(tmp_path / "logiqa.txt"), **common),
            dict(name="code", source="alpaca_json", path=str(tmp_path / "code.json"), **common),
            dict(name="chat", source="alpaca_json", path=str(tmp_path / "chat.json"), **common)]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("compare")
    out = tmp / "out"
    # the paper's four methods and cpi, whose stages get 2/3 of the budget after the fusion (4 of 6 steps)
    results = run_comparison(_task_files(tmp), lambda: tiny_llama(tokenizer), out, tokenizer=tokenizer,
                             training={**TRAINING, "fusion_stage_fraction": 2 / 3}, heuristic_groups=GROUPS,
                             methods=PAPER_AND_CPI, seeds=[0], evaluation=EVAL)
    return out, results


def test_all_methods_end_to_end_with_the_same_budget(comparison):
    out, results = comparison
    runs = {r["method"]: r for r in results["runs"]}
    assert list(runs) == PAPER_AND_CPI == list(METHODS[:5])
    cpi = runs.pop("cpi")
    # every method trained on exactly max_steps x batch examples, counted at the training step
    for method, run in runs.items():
        assert run["train_examples"] == STEPS * BATCH, method
        assert run["train_steps"] == STEPS, method
    # cpi: the probes of dpi, trained into the fused backbone, then 2/3 of the staged budget; the budget table
    # counts both, and says the stages' budgets differ
    assert cpi["probe_examples"] == 4 * PROBE_STEPS * BATCH and cpi["fields"] == {"staging": "dpi", "fusion": "cpi"}
    assert cpi["train_steps"] == 4 and cpi["train_examples"] == 4 * BATCH
    assert cpi["total_examples"] == (4 * PROBE_STEPS + 4) * BATCH
    assert (out / "runs" / "seed-0" / "cpi" / "dpi" / "transplant.safetensors").is_file()
    for method, run in runs.items():
        assert run["total_examples"] == run["train_examples"] + run["probe_examples"], method
        assert results["budget"]["total_examples"][f"{method}/seed-0"] == run["total_examples"]
    assert results["budget"]["same_budget"] is False  # cpi spent 2/3 of the stages' budget
    # the methods differ in their stages as the paper defines them
    assert runs["multitask"]["stages"] == [["gsm8k", "logiqa", "code", "chat"]]
    assert len(runs["multistage_random"]["stages"]) == 3
    assert runs["multistage_heuristic"]["stages"] == GROUPS
    # only DPI probes (4 tasks x probe_steps x batch examples, outside the budget) and only DPI freezes
    assert runs["dpi"]["probe_examples"] == 4 * PROBE_STEPS * BATCH and runs["dpi"]["probe_seconds"] > 0
    assert all(runs[m]["probe_examples"] == 0 for m in DEFAULT_METHODS if m != "dpi")
    assert all(f == 0 for m in DEFAULT_METHODS if m != "dpi" for f in runs[m]["frozen_fraction"])
    if len(runs["dpi"]["stages"]) > 1:
        assert runs["dpi"]["frozen_fraction"][1] > 0


def test_every_number_is_finite(comparison):
    _, results = comparison
    for record in [results["base"], *results["runs"]]:
        assert math.isfinite(record["macro"]) and 0 <= record["macro"] <= 10
        for task, entry in record["tasks"].items():
            assert math.isfinite(entry["nll"]) and entry["nll"] > 0, task
            assert math.isfinite(entry["score"]) and entry["n"] == 2, task
    assert results["task_metrics"] == {"gsm8k": ["gsm8k_accuracy"], "logiqa": ["logiqa_accuracy"],
                                       "code": ["codebleu"], "chat": ["rougeL_proxy"]}


def test_forgetting_rows_cover_every_stage(comparison):
    out, results = comparison
    for run in results["runs"]:
        rows = run["after_stages"]
        assert [r["stage"] for r in rows] == list(range(1, len(run["stages"]) + 1))
        assert [r["tasks"] for r in rows] == run["stages"]
        assert all(math.isfinite(r["tasks_eval"][t]["nll"]) for r in rows for t in results["tasks"])
        # the last row is the final model's evaluation
        assert rows[-1]["tasks_eval"]["gsm8k"]["nll"] == run["tasks"]["gsm8k"]["nll"]
        trained_early = {t for r in rows[:-1] for t in r["tasks"]}
        assert set(run["forgetting"]["per_task"]) == trained_early
        # stage models are deleted once evaluated (keep_stage_models=False)
        assert not list((out / "runs" / "seed-0" / run["method"]).glob("stage-*"))
    assert results["runs"][0]["forgetting"]["mean"] is None  # multitask: one stage, nothing to forget


def test_tables_and_plots_are_written(comparison):
    out, results = comparison
    assert json.loads((out / "results.json").read_text())["budget"]["same_budget"] is False  # cpi: 2/3
    table = (out / "results.md").read_text()
    for text in ("| method | gsm8k (acc %) | logiqa (acc %) | code (CodeBLEU) | chat (ROUGE-L proxy) | macro (0-10) |",
                 "| base |", "| dpi |", "| cpi |", "probe s", "total examples",
                 "Same number of training examples for every run: **NO**",
                 "### multistage_random, seed 0", "## DPI diagnostics", "Jaccard overlap", "**proxy**",
                 "## Against multitask, paired by seed", "| cpi |"):
        assert text in table, text
    assert results["paired"]["reference"] == "multitask"
    assert list(results["paired"]["methods"]) == [m for m in PAPER_AND_CPI if m != "multitask"]
    assert results["paired"]["methods"]["dpi"]["seeds"] == [0]
    for plot in ("scores.png", "forgetting.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and (out / plot).stat().st_size > 5000


def test_finished_runs_are_reused(comparison, tokenizer):
    out, results = comparison

    def fail():
        raise AssertionError("a finished run was trained again")

    # the paper's four methods, without cpi's fusion_stage_fraction: that field is cpi's alone, so their runs are kept
    again = run_comparison(_task_files(out.parent), fail, out, tokenizer=tokenizer, training=TRAINING,
                           heuristic_groups=GROUPS, seeds=[0], evaluation=EVAL)
    assert [r["macro"] for r in again["runs"]] == [r["macro"] for r in results["runs"] if r["method"] != "cpi"]


def test_bad_input_fails_before_training(tmp_path, tokenizer):
    specs = _task_files(tmp_path)

    def never():
        raise AssertionError("the model must not be loaded for invalid input")

    common = dict(tokenizer=tokenizer, training=TRAINING, evaluation=EVAL)
    with pytest.raises(DPIConfigError, match="every task exactly once"):
        run_comparison(specs, never, tmp_path / "o", heuristic_groups=[["gsm8k"], ["code"]], **common)
    with pytest.raises(DPIConfigError, match="needs heuristic_groups"):
        run_comparison(specs, never, tmp_path / "o", **common)
    with pytest.raises(DPIConfigError, match="set by the comparison runner"):
        run_comparison(specs, never, tmp_path / "o", methods=["dpi"], tokenizer=tokenizer, evaluation=EVAL,
                       training={**TRAINING, "staging": "given"})
    with pytest.raises(DPIConfigError, match="not DPIConfig fields"):
        run_comparison(specs, never, tmp_path / "o", methods=["dpi"], tokenizer=tokenizer, evaluation=EVAL,
                       training={**TRAINING, "max_stpes": 3})
    with pytest.raises(DPIConfigError, match="no metric for task 'code'"):
        run_comparison(specs, never, tmp_path / "o", methods=["dpi"], tokenizer=tokenizer, training=TRAINING)
    with pytest.raises(DPIConfigError, match="eval split"):
        run_comparison([dict(s, eval_samples=0) for s in specs], never, tmp_path / "o", methods=["dpi"], **common)
    with pytest.raises(DPIConfigError, match="not valid"):
        run_comparison(specs, never, tmp_path / "o", methods=["sequential"], **common)
    with pytest.raises(DPIConfigError, match="judge"):
        EvalSettings(metrics={"chat": "judge_score"})
    with pytest.raises(DPIConfigError, match="unknown key 'forgeting'"):
        EvalSettings.from_dict({"forgeting": "nll"})


def test_sweep_over_core_fraction_and_scope(tmp_path, tokenizer):
    specs = [s for s in _task_files(tmp_path) if s["name"] in ("gsm8k", "chat")]  # two tasks: two stages
    groups = [["gsm8k"], ["chat"]]
    result = run_sweep(specs, lambda: tiny_llama(tokenizer), tmp_path / "sweep", tokenizer=tokenizer,
                       training=TRAINING, core_fractions=[0.01, 0.2], scopes=["global", "per_tensor"],
                       staging="given", stage_groups=groups,
                       evaluation={"metrics": {"chat": "rougeL_proxy"}, "metric_samples": 0})
    points = {p["name"]: p for p in result["points"]}
    assert set(points) == {"p0.01-global", "p0.2-global", "p0.01-per_tensor", "p0.2-per_tensor", "unfrozen"}
    assert result["budget"]["same_budget"] is True
    for name, point in points.items():
        assert point["stages"] == groups and math.isfinite(point["forgetting"]), name
        assert point["macro"] is None  # metric_samples=0: held-out NLL only
    # more of the first stage is frozen at a larger p; nothing without freezing
    assert points["p0.2-global"]["frozen_fraction"][1] > points["p0.01-global"]["frozen_fraction"][1] > 0
    assert points["unfrozen"]["frozen_fraction"] == [0, 0]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 5000
    assert "| p0.2-per_tensor | 0.2 | per_tensor | 2 |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_recipe_and_cli_parsers(tmp_path):
    path, data = ROOT / "recipes" / "compare-smollm2-cpu.yaml", {"data_dir": str(FIXTURE_DATA)}
    recipe = load_compare_recipe(path, data)
    tasks = recipe.recipe.tasks
    assert [t.name for t in tasks] == ["gsm8k", "codealpaca", "logiqa", "alpaca"]
    assert tasks[0].path == f"{FIXTURE_DATA}/gsm8k/train.jsonl" and all(t.eval_samples > 0 for t in tasks)
    assert recipe.recipe.model.name_or_path == "offline:smollm2-135m-instruct"
    assert recipe.methods == list(DEFAULT_METHODS)
    assert recipe.heuristic_groups == [["gsm8k", "logiqa"], ["codealpaca", "alpaca"]]
    assert recipe.training["max_steps"] > 0 and isinstance(recipe.training["learning_rate"], float)
    assert "staging" not in recipe.training and "output_dir" not in recipe.training
    assert recipe.evaluation.metrics["alpaca"] == ["rougeL_proxy"] and recipe.evaluation.forgetting == "nll"
    assert recipe.sweep["core_fractions"][0] == 0.001 and recipe.output_dir == "runs/compare-smollm2-cpu"
    with pytest.raises(DPIConfigError, match="unknown key 'max_stpes'"):
        load_compare_recipe(path, {**data, "max_stpes": 3})
    with pytest.raises(DPIConfigError, match="set by the comparison runner"):
        load_compare_recipe(path, {**data, "staging": "given"})
    with pytest.raises(DPIConfigError, match=r"\['fusion'\] are set by the comparison runner"):
        load_compare_recipe(path, {**data, "fusion": "cpi"})
    # cpi's own fields pass to the runner (which applies them to cpi runs only), checked as numbers
    with_cpi = load_compare_recipe(path, ["--data_dir", str(FIXTURE_DATA), "--fusion_stage_fraction", "0.5"])
    assert with_cpi.training["fusion_stage_fraction"] == 0.5
    with pytest.raises(DPIConfigError, match="fusion_factor='big' must be a number"):
        load_compare_recipe(path, {**data, "fusion_factor": "big"})
    assert recipe.vary_rows is False
    raw = yaml.safe_load(path.read_text())
    for value, ok in ((True, True), ("yes", False)):
        raw["compare"]["vary_rows"] = value
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        if ok:
            assert load_compare_recipe(tmp_path / "r.yaml", data).vary_rows is True
        else:
            with pytest.raises(DPIConfigError, match="compare.vary_rows='yes' must be true or false"):
                load_compare_recipe(tmp_path / "r.yaml", data)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="dpi-hf")
    sub = parser.add_subparsers(dest="command")
    add_compare_parser(sub, parents=[common])
    add_sweep_parser(sub, parents=[common])
    args, extra = parser.parse_known_args(["compare", "r.yaml", "--seeds", "1", "2", "3", "--max_steps", "20",
                                           "--debug"])
    assert args.seeds == [1, 2, 3] and args.debug and args.resume and extra == ["--max_steps", "20"]
    args, extra = parser.parse_known_args(["sweep", "r.yaml", "--core-fractions", "0.001", "0.01", "--scopes",
                                           "global", "--no-resume"])
    assert args.core_fractions == [0.001, 0.01] and args.scopes == ["global"] and not args.resume and not extra


def test_compare_command_from_a_recipe(tmp_path, tokenizer, capsys):
    """The CLI path: a recipe file with a saved tiny model, two methods, overrides as `dpi-hf compare` passes them."""
    tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    specs = _task_files(tmp_path)
    training = {k: v for k, v in TRAINING.items()}
    recipe = {"vars": {"data_dir": str(tmp_path)},
              "model": {"name_or_path": str(tmp_path / "model"), "dtype": "float32"},
              "tasks": [dict(s, path=s["path"].replace(str(tmp_path), "${data_dir}")) for s in specs],
              "eval": {"metrics": {"code": "codebleu", "chat": ["rougeL_proxy", "nll"]}, "max_samples": 2,
                       "max_new_tokens": 4, "before": False},
              "runtime": {"num_threads": 1},
              "compare": {"heuristic_groups": GROUPS, "nll_samples": 2, "forgetting": "none"},
              "output_dir": str(tmp_path / "results"), **training}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parser = argparse.ArgumentParser(prog="dpi-hf")
    add_compare_parser(parser.add_subparsers(dest="command"))
    args, overrides = parser.parse_known_args(["compare", str(path), "--methods", "multitask", "dpi",
                                               "--max_steps", "4"])
    assert compare_command(args, overrides) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["multitask", "dpi"] and results["base"] is None
    assert all(r["train_examples"] == 4 * BATCH and r["after_stages"] == [] for r in results["runs"])
    assert results["task_metrics"]["chat"] == ["rougeL_proxy"]  # the NLL is always there, not an extra column
    assert "| multitask |" in capsys.readouterr().out


def test_paired_differences_against_multitask_by_hand():
    from dpi_hf.compare.summary import paired_differences
    from dpi_hf.compare.tables import _paired_lines

    def run(method, seed, a, b, macro):
        return {"method": method, "seed": seed, "macro": macro, "tasks": {"a": {"nll": a}, "b": {"nll": b}}}

    runs = [run("multitask", 0, 1.0, 2.0, 3.0), run("multitask", 1, 1.2, 2.2, 4.0),
            run("dpi", 0, 0.9, 2.1, 3.5), run("dpi", 1, 1.0, 2.0, 3.0),
            run("cpi", 1, 1.3, 2.3, None)]  # cpi ran one seed and has no macro: its pairs are only seed 1's NLL
    paired = paired_differences(runs, ["a", "b"], ["multitask", "dpi", "cpi"], "multitask")
    assert set(paired) == {"dpi", "cpi"}
    dpi = paired["dpi"]
    # mean NLL differences: seed 0 (1.5 - 1.5) = 0, seed 1 (1.5 - 1.7) = -0.2
    assert dpi["seeds"] == [0, 1] and dpi["lower_nll"] == 1
    assert dpi["mean_nll"]["mean"] == pytest.approx(-0.1) and dpi["mean_nll"]["std"] == pytest.approx(0.02 ** 0.5)
    assert dpi["nll"]["a"]["mean"] == pytest.approx((-0.1 - 0.2) / 2)
    assert dpi["macro"]["mean"] == pytest.approx((0.5 - 1.0) / 2) and dpi["higher_macro"] == 1
    cpi = paired["cpi"]
    assert cpi["seeds"] == [1] and cpi["mean_nll"]["mean"] == pytest.approx(0.1) and cpi["mean_nll"]["std"] is None
    assert cpi["macro"] == {"mean": None, "std": None, "n": 0} and cpi["lower_nll"] == 0
    text = "\n".join(_paired_lines({"reference": "multitask", "methods": paired}, ["a", "b"]))
    assert "## Against multitask, paired by seed" in text
    assert "| dpi | -0.100 ± 0.141 | 1/2 | -0.150 ± 0.071 | -0.050 ± 0.212 | -0.25 ± 1.06 | 1/2 |" in text
    assert "| cpi | 0.100 | 0/1 |" in text
    assert _paired_lines({"reference": None, "methods": {}}, ["a"]) == []


def test_single_task_affinity_and_sequential_freeze_with_rows_varied(tmp_path, tokenizer):
    """The methods of the seesaw question: each task alone on the steps its rows get in the mixture (the same
    examples in all), DPI grouped on gradient affinity, sequential stages with earlier cores frozen; with vary_rows
    each seed trains and scores other rows, and the score differences against multitask carry 95 % intervals."""
    from dpi_hf.compare.context import build_context

    specs = _task_files(tmp_path)
    training = {**TRAINING, "core_signal": "fisher", "max_steps": 8}  # affinity reads the probes' gradients
    methods = ["multitask", "single_task", "dpi_affinity", "sequential_freeze"]
    results = run_comparison(specs, lambda: tiny_llama(tokenizer), tmp_path / "out", tokenizer=tokenizer,
                             training=training, methods=methods, seeds=[0, 1], evaluation=EVAL, include_base=False,
                             vary_rows=True)
    tasks = results["tasks"]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    for seed in (0, 1):
        single, mixture = runs[("single_task", seed)], runs[("multitask", seed)]
        # 10 training rows per task: 8 steps split 2/2/2/2, the examples the mixture trains on
        assert [p["tasks"] for p in single["phases"]] == [[t] for t in tasks] == single["stages"]
        assert [p["steps"] for p in single["phases"]] == [2, 2, 2, 2]
        assert single["train_examples"] == mixture["train_examples"] == 8 * BATCH and single["probe_examples"] == 0
        assert set(single["tasks"]) == set(tasks) and all(math.isfinite(e["nll"]) for e in single["tasks"].values())
        assert single["macro"] is not None
        affinity = runs[("dpi_affinity", seed)]
        assert affinity["fields"] == {"staging": "dpi", "overlap": "affinity"}
        assert affinity["plan"]["overlap"] == "affinity" and affinity["plan"]["affinity"] is not None
        sequential = runs[("sequential_freeze", seed)]
        assert sequential["stages"] == [[t] for t in tasks] and sequential["probe_examples"] > 0
        assert all(f > 0 for f in sequential["frozen_fraction"][1:])
    assert results["settings"]["vary_rows"] is True
    single = results["paired"]["methods"]["single_task"]["score"]
    for t in tasks:
        d = single[t]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    assert "Δ gsm8k score" in (tmp_path / "out" / "results.md").read_text()
    assert results["files"]["paired_plot"] == "paired.png" and (tmp_path / "out" / "paired.png").stat().st_size > 0
    # seed 1's rows are other rows than seed 0's (training and held-out), both runs of a seed the same rows
    ctx = build_context(specs, lambda: tiny_llama(tokenizer), tmp_path / "ctx", None, EVAL, tokenizer, "auto", False,
                        False, vary_rows=True)
    other = ctx.for_seed(1)
    assert ctx.for_seed(0) is ctx
    for t in tasks:
        assert other.eval_sets[t]["prompt"] != ctx.eval_sets[t]["prompt"]
        assert other.train_sets[t]["prompt"] != ctx.train_sets[t]["prompt"]
    with pytest.raises(DPIConfigError, match="vary_rows draws other rows"):
        build_context({"a": None}, None, tmp_path, None, EVAL, tokenizer, "auto", False, False, vary_rows=True)


def test_mean_ci_by_hand():
    from dpi_hf.compare.summary import mean_ci, t_quantile_975

    d = mean_ci([0.1, 0.3, 0.2])
    half = 4.303 * 0.1 / 3 ** 0.5  # t(0.975, 2 df) · sd / sqrt(n)
    assert d["mean"] == pytest.approx(0.2) and d["lo"] == pytest.approx(0.2 - half) and d["hi"] == pytest.approx(0.2 + half)
    assert mean_ci([0.5])["lo"] is None and mean_ci([])["mean"] is None
    assert t_quantile_975(20) == pytest.approx(2.086, abs=0.002) and t_quantile_975(60) == pytest.approx(2.000, abs=0.002)
