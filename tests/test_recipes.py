"""Recipes: every YAML in recipes/ validates (keys known, sources well formed, nothing downloaded); overrides,
variables, type conversion and the errors for unknown keys."""

import re
from pathlib import Path

import pytest
import yaml

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.recipes import (
    Recipe,
    build_training_args,
    load_recipe,
    parse_overrides,
    read_recipe,
    resolve_recipe,
    wants_offline,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHARED_DATA = ROOT.parent / "shared" / "data"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _minimal(**extra):
    data = {
        "model": {"name_or_path": "offline:smollm2-135m-instruct"},
        "tasks": [{"name": "a", "source": "prompt_completion", "path": "a.jsonl"},
                  {"name": "b", "source": "prompt_completion", "path": "b.jsonl"}],
        "output_dir": "out",
        "use_cpu": True,
        "bf16": False,
    }
    data.update(extra)
    return data


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _validate(path: Path):
    """Validate one recipe file the way its command reads it; GPU recipes with use_cpu so bf16 passes on a CPU."""
    raw_text = yaml.safe_load(path.read_text())
    overrides = {"data_dir": str(SHARED_DATA)} if "${data_dir}" in path.read_text() else {}
    if raw_text.get("bf16"):
        overrides["use_cpu"] = True
    if "sequential" in raw_text:
        from dpi_hf.compare.forgetting import load_sequential_recipe

        return load_sequential_recipe(path, overrides)[0]
    if "compare" in raw_text or "sweep" in raw_text:
        from dpi_hf.compare import load_compare_recipe

        return load_compare_recipe(path, overrides).recipe
    return load_recipe(path, overrides)


def test_there_are_the_expected_recipes():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "smollm2-cpu-local.yaml", "paper-llama2-7b.yaml", "paper-mistral-7b.yaml",
            "paper-qwen1.5-7b.yaml", "paper-gemma-9b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_and_its_sources_are_well_formed(path):
    recipe = _validate(path)
    assert recipe.tasks and len({t.name for t in recipe.tasks}) == len(recipe.tasks)
    for task in recipe.tasks:
        if task.source == "hub":
            assert HUB_ID.match(task.path), f"{task.name}: {task.path!r} is not a Hub dataset id"
        elif task.source == "reasoning_gym":
            import reasoning_gym

            assert task.path in reasoning_gym.factory.DATASETS, task.path
            # the generator accepts the recipe's options (generation is local and instant; nothing downloaded)
            entry = reasoning_gym.create_dataset(task.path, size=1, seed=task.seed, **task.kwargs)[0]
            assert entry["answer"] is not None
        else:
            assert Path(task.path).is_file(), f"{task.name}: {task.path} missing"
        assert task.eval_samples > 0, f"{task.name}: nothing held out to score"
    for task in recipe.tasks:  # every task has a metric, and metrics are known (validated by EvalSpec)
        assert recipe.eval.metrics_for(task)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("paper-")],
                         ids=lambda p: p.name)
def test_paper_recipes_use_the_papers_settings(path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert raw["core_fraction"] == 0.01 and raw["jaccard_threshold"] == 0.1 and raw["bf16"] is True
    assert raw["model"]["dtype"] == "bfloat16"
    assert f"accelerate launch --multi_gpu --num_processes 8 -m dpi_hf.cli train recipes/{path.name}" in text
    sources = {(t["path"], t.get("config")) for t in raw["tasks"]}
    assert {("openai/gsm8k", "main"), ("sahil280114/codealpaca", None), ("lucasmccabe/logiqa", None),
            ("tatsu-lab/alpaca", None), ("HuggingFaceH4/ultrachat_200k", None)} == sources
    assert not wants_offline(read_recipe(path))


def test_quickstart_is_offline_and_cpu_sized():
    raw = read_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert wants_offline(raw)
    recipe = Recipe.from_dict(raw)
    assert recipe.model.name_or_path == "offline:smollm2-135m-instruct"
    assert len({t.path for t in recipe.tasks}) == 3 and all(t.source == "reasoning_gym" for t in recipe.tasks)
    a = recipe.args
    assert a.use_cpu and not a.bf16 and not a.gradient_checkpointing and a.max_length <= 256
    assert a.per_device_train_batch_size == 4 and 5e-5 <= a.learning_rate <= 2e-4


def test_unknown_top_level_key_suggests_the_closest(tmp_path):
    with pytest.raises(DPIConfigError, match=r"unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        load_recipe(_write(tmp_path, _minimal(learnig_rate=1e-4)))
    with pytest.raises(DPIConfigError, match=r"'evals'.*did you mean 'eval'"):
        load_recipe(_write(tmp_path, _minimal(evals={})))


@pytest.mark.parametrize("section, key, suggestion", [
    ("model", "name_or_pth", "name_or_path"),
    ("eval", "max_new_token", "max_new_tokens"),
    ("runtime", "num_thread", "num_threads"),
])
def test_unknown_section_key_suggests_the_closest(tmp_path, section, key, suggestion):
    data = _minimal()
    data.setdefault(section, {})[key] = 1
    with pytest.raises(DPIConfigError, match=rf"{section}: unknown key '{key}' \(did you mean '{suggestion}'\?\)"):
        load_recipe(_write(tmp_path, data))


def test_unknown_task_key_and_metric(tmp_path):
    data = _minimal()
    data["tasks"][1]["max_sample"] = 3
    with pytest.raises(DPIConfigError, match=r"tasks\[1\].*'max_sample' \(did you mean 'max_samples'\?\)"):
        load_recipe(_write(tmp_path, data))
    with pytest.raises(DPIConfigError, match=r"unknown metric 'rougeL_prox'.*did you mean 'rougeL_proxy'"):
        load_recipe(_write(tmp_path, _minimal(eval={"metrics": {"a": "rougeL_prox"}})))
    with pytest.raises(DPIConfigError, match=r"eval.metrics names unknown task 'c'"):
        load_recipe(_write(tmp_path, _minimal(eval={"metrics": {"c": "nll"}})))


def test_stage_groups_with_an_unknown_task(tmp_path):
    with pytest.raises(DPIConfigError, match=r"stage_groups names unknown task 'bb' \(did you mean 'b'\?\)"):
        load_recipe(_write(tmp_path, _minimal(staging="given", stage_groups=[["a"], ["bb"]])))
    with pytest.raises(DPIConfigError, match=r"name every task exactly once; missing \['b'\]"):
        load_recipe(_write(tmp_path, _minimal(staging="given", stage_groups=[["a"]])))


def test_missing_sections_and_bad_yaml(tmp_path):
    with pytest.raises(DPIConfigError, match="not found"):
        read_recipe(tmp_path / "nope.yaml")
    with pytest.raises(DPIConfigError, match=r"not valid YAML at line \d+, column \d+: .*fix the syntax"):
        read_recipe(_write(tmp_path, "model:\n  name_or_path: [x\n"))
    with pytest.raises(DPIConfigError, match="is empty"):
        read_recipe(_write(tmp_path, ""))
    with pytest.raises(DPIConfigError, match="no `model:` section"):
        load_recipe(_write(tmp_path, {"tasks": _minimal()["tasks"]}))
    with pytest.raises(DPIConfigError, match="no `tasks:`"):
        load_recipe(_write(tmp_path, {"model": {"name_or_path": "x"}}))
    with pytest.raises(DPIConfigError, match=r"model.dtype='bfloat'.*did you mean 'bfloat16'"):
        load_recipe(_write(tmp_path, _minimal(model={"name_or_path": "x", "dtype": "bfloat"})))


def test_values_are_converted_the_hf_way(tmp_path):
    # PyYAML reads 5e-5 as a string; the field's argparse type makes it a float, as on the HF command line
    path = _write(tmp_path, "model: {name_or_path: x}\ntasks: [{name: a, path: a.jsonl, source: prompt_completion}]\n"
                            "learning_rate: 5e-5\nmax_steps: '7'\nuse_cpu: 'true'\nbf16: false\n"
                            f"output_dir: {tmp_path / 'o'}\n")
    args = load_recipe(path).args
    assert args.learning_rate == 5e-5 and args.max_steps == 7 and args.use_cpu is True
    with pytest.raises(DPIConfigError, match=r"max_steps='many' is not a valid value"):
        load_recipe(path, ["--max_steps", "many"])
    with pytest.raises(DPIConfigError, match=r"core_fraction=2\.0 must be a fraction"):
        load_recipe(path, ["--core_fraction", "2.0"])


def test_parse_overrides():
    assert parse_overrides(["--a", "1", "--b=x y", "--flag", "--c", "[1, 2]", "--d", "null", "--e", "*embed*"]) == [
        ("a", 1), ("b", "x y"), ("flag", True), ("c", [1, 2]), ("d", None), ("e", "*embed*")]
    assert parse_overrides(["--lr", "-1"]) == [("lr", -1)]
    with pytest.raises(DPIConfigError, match="unexpected argument 'oops'"):
        parse_overrides(["oops"])


def test_overrides_reach_fields_sections_tasks_and_variables(tmp_path):
    data = _minimal(vars={"data_dir": "/nowhere"})
    data["tasks"][0]["path"] = "${data_dir}/a.jsonl"
    path = _write(tmp_path, data)
    recipe = load_recipe(path, ["--learning-rate", "3e-4", "--model.dtype", "float32", "--tasks.0.max_samples", "8",
                                "--tasks.b.eval_samples=2", "--data_dir", "/data", "--eval.metrics.b", "[nll]",
                                "--core_exclude", "*embed*", "--runtime.num_threads", "1"])
    assert recipe.args.learning_rate == 3e-4 and recipe.args.core_exclude == ["*embed*"]
    assert recipe.model.dtype == "float32" and recipe.runtime.num_threads == 1
    assert recipe.tasks[0].max_samples == 8 and recipe.tasks[0].path == "/data/a.jsonl"
    assert recipe.tasks[1].eval_samples == 2 and recipe.eval.metrics == {"b": ["nll"]}
    assert "/data/a.jsonl" in recipe.to_yaml() and "${data_dir}" not in recipe.to_yaml()


def test_override_errors_name_the_fix(tmp_path):
    path = _write(tmp_path, _minimal())
    with pytest.raises(DPIConfigError, match=r"no task 5; the recipe has tasks 0-1"):
        read_recipe(path, ["--tasks.5.max_samples", "1"])
    with pytest.raises(DPIConfigError, match=r"no task named 'c'"):
        read_recipe(path, ["--tasks.c.max_samples", "1"])
    with pytest.raises(DPIConfigError, match=r"'modle' is not a section \(did you mean 'model'\?\)"):
        read_recipe(path, ["--modle.dtype", "float32"])
    with pytest.raises(DPIConfigError, match="a whole section cannot be replaced"):
        read_recipe(path, ["--model", "x"])
    with pytest.raises(DPIConfigError, match=r"unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_recipe(path, ["--max_step", "10"])


def test_undefined_variable(tmp_path):
    data = _minimal()
    data["tasks"][0]["path"] = "${data_dri}/a.jsonl"
    path = _write(tmp_path, _minimal(vars={"data_dir": "d"}, tasks=data["tasks"]))
    with pytest.raises(DPIConfigError, match=r"uses \$\{data_dri\}.*did you mean 'data_dir'.*--data_dri VALUE"):
        read_recipe(path)
    # an undeclared variable can be given on the command line; a whole-string variable keeps its type
    raw = resolve_recipe({"max_steps": "${steps}", "x": "a-${steps}"}, ["--steps", "12"])
    assert raw == {"max_steps": 12, "x": "a-12"}


def test_build_training_args_rejects_unknown_fields():
    with pytest.raises(DPIConfigError, match=r"unknown key 'probe_step' \(did you mean 'probe_steps'\?\)"):
        build_training_args({"probe_step": 3})


def test_wants_offline_rules():
    offline = {"model": {"name_or_path": "offline:smollm2-135m-instruct"},
               "tasks": [{"name": "a", "source": "reasoning_gym"}]}
    assert wants_offline(offline)
    assert not wants_offline({**offline, "tasks": [{"name": "a", "path": "x/y"}]})  # a Hub dataset (the default)
    assert not wants_offline({**offline, "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M"}})
    assert wants_offline({**offline, "model": {"name_or_path": "x/y"}, "runtime": {"offline": True}})


def test_quickstart_tasks_score_their_gold_answers_with_the_verifiers():
    """The quickstart's held-out rows (generator options included) score 1.0 with their references, 0 otherwise."""
    from dpi_hf.data import load_task
    from dpi_hf.evaluation import reasoning_gym_score

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    for task in recipe.tasks:
        rows = load_task(task)["eval"]
        assert len(rows) == task.eval_samples
        gold = reasoning_gym_score([f"Answer: {r}" for r in rows["reference"]], rows)
        assert gold["reasoning_gym"] == 1.0, task.name
        assert reasoning_gym_score(["Answer: 123456789"] * len(rows), rows)["reasoning_gym"] < 0.5, task.name
