"""Recipes: every YAML in recipes/ validates (keys known, sources well formed, nothing downloaded); the local-data
recipes need --data_dir and their Hub twins map the Hub's columns to the same rows; overrides, variables, type
conversion and the errors for unknown keys."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURE_DATA, real_data_dir
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
# recipes that read local copies of the datasets from ${data_dir}, and their Hub twins
LOCAL_RECIPES = sorted(p for p in RECIPES if "${data_dir}" in p.read_text())
HUB_TWINS = {"smollm2-cpu-local.yaml": "smollm2-cpu-hub.yaml",
             "compare-smollm2-cpu.yaml": "compare-smollm2-cpu-hub.yaml"}
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
    overrides = {"data_dir": str(FIXTURE_DATA)} if "${data_dir}" in path.read_text() else {}
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
    assert {("openai/gsm8k", "main"), ("sahil2801/CodeAlpaca-20k", None), ("lucasmccabe/logiqa", None),
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
    (tmp_path / "declared").mkdir()
    (tmp_path / "given").mkdir()
    data = _minimal(vars={"data_dir": str(tmp_path / "declared")})
    data["tasks"][0]["path"] = "${data_dir}/a.jsonl"
    path = _write(tmp_path, data)
    given = tmp_path / "given"
    recipe = load_recipe(path, ["--learning-rate", "3e-4", "--model.dtype", "float32", "--tasks.0.max_samples", "8",
                                "--tasks.b.eval_samples=2", "--data_dir", str(given), "--eval.metrics.b", "[nll]",
                                "--core_exclude", "*embed*", "--runtime.num_threads", "1"])
    assert recipe.args.learning_rate == 3e-4 and recipe.args.core_exclude == ["*embed*"]
    assert recipe.model.dtype == "float32" and recipe.runtime.num_threads == 1
    assert recipe.tasks[0].max_samples == 8 and recipe.tasks[0].path == f"{given}/a.jsonl"
    assert recipe.tasks[1].eval_samples == 2 and recipe.eval.metrics == {"b": ["nll"]}
    assert f"{given}/a.jsonl" in recipe.to_yaml() and "${data_dir}" not in recipe.to_yaml()


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


# --- local-data recipes and their Hub twins -----------------------------------------------------------------------


def test_local_recipes_have_no_default_data_folder_and_name_their_twin():
    assert [p.name for p in LOCAL_RECIPES] == sorted(HUB_TWINS)
    for path in LOCAL_RECIPES:
        text = path.read_text()
        assert "shared/" not in text and "data_dir:" not in text  # no default folder: --data_dir is required
        header = text.split("\nmodel:")[0]
        assert "--data_dir DIR" in header and "LOCAL COPIES" in header and f"recipes/{HUB_TWINS[path.name]}" in header


@pytest.mark.parametrize("path", LOCAL_RECIPES, ids=lambda p: p.name)
def test_local_recipe_without_its_data_folder_is_one_error_naming_data_dir(path, tmp_path):
    with pytest.raises(DPIConfigError, match=r"uses \$\{data_dir\} but no value is given.*pass --data_dir VALUE, the "
                                             r"folder that holds the local copies"):
        _validate_without_data(path, {})
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DPIConfigError, match=rf"reads its rows from '\$\{{data_dir\}}/gsm8k/train.jsonl', but "
                                             rf"the folder '{re.escape(str(missing))}' does not exist; "
                                             r"pass --data_dir DIR"):
        _validate_without_data(path, {"data_dir": str(missing)})


def _validate_without_data(path: Path, overrides: dict):
    raw = yaml.safe_load(path.read_text())
    if "compare" in raw:
        from dpi_hf.compare import load_compare_recipe

        return load_compare_recipe(path, overrides)
    return load_recipe(path, overrides)


# the fields of a task that say where its rows come from; everything else must be the same in a twin
_SOURCE_FIELDS = ("source", "path", "config", "split", "columns", "kwargs")


@pytest.mark.parametrize("local_name", sorted(HUB_TWINS))
def test_hub_twin_is_the_local_recipe_with_hub_sources(local_name):
    local = read_recipe(ROOT / "recipes" / local_name, {"data_dir": str(FIXTURE_DATA)})
    twin = read_recipe(ROOT / "recipes" / HUB_TWINS[local_name])
    assert twin.pop("output_dir") != local.pop("output_dir")
    local_tasks, twin_tasks = local.pop("tasks"), twin.pop("tasks")
    assert twin == local  # model, eval, runtime, compare/sweep and every training field
    assert [t["name"] for t in twin_tasks] == [t["name"] for t in local_tasks]
    for mine, theirs in zip(twin_tasks, local_tasks):
        assert mine["source"] == "hub" and HUB_ID.match(mine["path"])
        assert {k: v for k, v in mine.items() if k not in _SOURCE_FIELDS} == \
               {k: v for k, v in theirs.items() if k not in _SOURCE_FIELDS}
    assert not wants_offline(read_recipe(ROOT / "recipes" / HUB_TWINS[local_name]))


# The local records that map one to one onto a Hub row: complete records (the file sources reject a record without
# its fields) and, for LogiQA, blocks whose options carry the labels "A." to "D." that lucasmccabe/logiqa's script
# strips. Returns the records in the file's own format (JSON objects, or LogiQA's 8-line blocks).
def _mappable_records(source: str, path: Path) -> tuple[list, int]:
    if source == "logiqa_txt":
        lines = path.read_text().rstrip("\n").split("\n")
        blocks = [lines[i:i + 8] for i in range(0, len(lines), 8)]
        return [b for b in blocks if all(o.startswith(f"{c}.") for c, o in zip("ABCD", b[4:]))], len(blocks)
    text = path.read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    needed = ("question", "answer") if source == "gsm8k_jsonl" else ("instruction", "output")
    return [r for r in records if all(isinstance(r.get(k), str) and r[k].strip() for k in needed)], len(records)


def _write_records(source: str, records: list, path: Path) -> None:
    if source == "logiqa_txt":
        path.write_text("\n".join(line for block in records for line in block) + "\n")
    else:
        path.write_text(json.dumps(records))


def _hub_row(source: str, record) -> dict:
    """The row the Hub dataset has for ``record`` (its columns and value types)."""
    if source == "gsm8k_jsonl":  # openai/gsm8k (main): question, answer
        return {"question": record["question"], "answer": record["answer"]}
    if source == "alpaca_json":  # tatsu-lab/alpaca, sahil2801/CodeAlpaca-20k: instruction, input, output
        return {"instruction": record["instruction"], "input": record["input"], "output": record["output"]}
    _, letter, context, query, *options = record  # lucasmccabe/logiqa: context, query, options, correct_option
    return {"context": context, "query": query, "options": [o[2:] for o in options],
            "correct_option": "abcd".index(letter.strip())}


def _comparable(row: dict) -> dict:
    meta = json.loads(row["meta"])
    meta.pop("source")  # "hub" against the file source's name
    return dict(row, meta=meta)


@pytest.fixture(params=["fixtures", "real"])
def local_data(request) -> Path:
    """The committed fixture folder, then the real data folder (skipped, or failed in CI, when it is absent)."""
    return FIXTURE_DATA if request.param == "fixtures" else real_data_dir()


@pytest.mark.parametrize("task_name", ["gsm8k", "codealpaca", "logiqa", "alpaca"])
def test_hub_twin_columns_give_the_local_rows(task_name, local_data, monkeypatch, tmp_path):
    """The twins' `columns:` mapping for a task, applied to Hub-shaped rows made from the local file, gives the rows
    the local file source gives (offline: load_dataset is replaced, and asked for the twin's id, config and split)."""
    import datasets

    from dpi_hf.data import load_task

    pairs = []  # (local spec, twin spec) of this task in every local recipe that has it
    for local_name, twin_name in HUB_TWINS.items():
        local = {t.name: t for t in _validate(ROOT / "recipes" / local_name).tasks}
        twin = {t.name: t for t in _validate(ROOT / "recipes" / twin_name).tasks}
        if task_name in local:
            pairs.append((local[task_name], twin[task_name]))
    assert pairs
    source_of = lambda spec: (spec.source, spec.path, spec.config, spec.split, spec.columns, spec.kwargs)  # noqa: E731
    assert len({repr(source_of(mine)) for mine, _ in pairs}) == 1 and len({repr(source_of(t)) for _, t in pairs}) == 1
    mine, task = pairs[0]
    mine = dataclasses.replace(mine, path=mine.path.replace(str(FIXTURE_DATA), str(local_data)))
    records, total = _mappable_records(mine.source, Path(mine.path))
    assert len(records) >= 0.9 * total > 0
    _write_records(mine.source, records, tmp_path / task_name)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list([_hub_row(mine.source, r) for r in records])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    every_row = {"max_samples": None, "eval_samples": 0}
    from_hub = load_task(dataclasses.replace(task, **every_row))["train"].to_list()
    from_file = load_task(dataclasses.replace(mine, path=str(tmp_path / task_name), **every_row))["train"].to_list()
    assert calls == [(task.path, task.config, task.split, task.kwargs)]
    assert len(from_hub) == len(from_file) == len(records)
    for i, (hub_row, file_row) in enumerate(zip(from_hub, from_file)):
        assert _comparable(hub_row) == _comparable(file_row), i


@pytest.mark.parametrize("name, share", [("quickstart.yaml", 0.5), ("compare-smollm2-cpu.yaml", 1.0)])
def test_cpu_recipes_probe_at_most_a_share_of_their_training_examples(name, share):
    """One-pass no-step Σg² probes: the quickstart's cost at most half its training examples, the comparison's at most
    its training examples (each method's budget)."""
    raw = read_recipe(ROOT / "recipes" / name, {"data_dir": str(FIXTURE_DATA)} if "compare" in name else ())
    for section in ("compare", "sweep"):
        raw.pop(section, None)
    a = Recipe.from_dict(raw).args
    tasks = len(raw["tasks"])
    probe_examples = tasks * a.probe_steps * (a.probe_batch_size or a.per_device_train_batch_size)
    assert probe_examples <= share * a.max_steps * a.per_device_train_batch_size
    assert a.probe_updates_weights is False and a.probe_reliability == "split_half" and a.core_signal == "fisher"
