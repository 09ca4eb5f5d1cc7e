"""The protect-an-existing-skill workflow from the command line, and the forgetting benchmark (`dpi-hf sequential`)
end to end on a tiny model with reasoning-gym tasks."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import _assert_one_line_error, _run, _tiny_recipe, tiny_model_dir  # noqa: F401  (fixture)

from dpi_hf import load_cores


def _one_task(path, name, **fields):
    recipe = yaml.safe_load(path.read_text())
    recipe["tasks"] = [t for t in recipe["tasks"] if t["name"] == name]
    recipe["eval"]["metrics"] = {name: ["nll"]}
    recipe.update(fields)
    out = path.parent / f"{name}.yaml"
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def test_probe_one_task_then_train_another_with_its_cores_protected(capsys, tmp_path, tiny_model_dir):
    base = _tiny_recipe(tmp_path, tiny_model_dir)
    probe = _one_task(base, "add", output_dir=str(tmp_path / "add-cores"), probe_updates_weights=False)
    rc, out, err = _run(capsys, "probe", probe)
    assert rc == 0, err
    assert "--protect_cores_from" in out and "split-half reliability r" in out
    cores = load_cores(tmp_path / "add-cores" / "dpi" / "cores.safetensors")
    # the second recipe sets no DPI field but the protection: plain SFT plus the frozen cores
    train = _one_task(base, "rev", output_dir=str(tmp_path / "rev"))
    recipe = yaml.safe_load(train.read_text())
    for k in ("probe_steps", "core_fraction", "jaccard_threshold"):
        recipe.pop(k)
    train.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc, out, err = _run(capsys, "train", train, "--protect_cores_from", tmp_path / "add-cores", "--weight_decay", "0.1")
    assert rc == 0, err
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "rev" / "model.safetensors"))
    core = cores["add"]
    changed = 0
    for name in core.names():
        idx = core.indices(name)
        assert torch.equal(after[name].flatten()[idx], before[name].flatten()[idx]), name
    for name in before:
        changed += int((after[name] != before[name]).sum())
    assert changed > 0
    assert (tmp_path / "rev" / "dpi" / "protected.json").is_file() and "protected.json" in out
    # an unknown protected task is one clear error, before training
    rc, _, err = _run(capsys, "train", train, "--protect_cores_from", tmp_path / "add-cores", "--protect_tasks",
                      "[nope]", "--output_dir", tmp_path / "rev2")
    _assert_one_line_error(rc, err, "protect_tasks names ['nope']", "holds ['add']")
    assert not (tmp_path / "rev2").exists()


_SUMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
_METHODS = ["none", "freeze", "random_per_tensor", "other_core", "ewc", "lora", "wise_ft", "core_interp", "replay"]


def _forgetting_recipe(tmp_path, model_dir):
    """Two short reasoning-gym tasks (A: sums; B: three-term arithmetic) on the conftest tiny model, 2 steps each."""
    path = _tiny_recipe(tmp_path, model_dir)
    recipe = yaml.safe_load(path.read_text())
    for k in ("core_fraction", "jaccard_threshold", "eval"):
        recipe.pop(k)
    recipe["tasks"] = [
        {"name": "sums", "source": "reasoning_gym", "path": "chain_sum", "kwargs": _SUMS, "max_samples": 16,
         "eval_samples": 4, "validation_samples": 4, "seed": 1, "eval_seed": 101},
        {"name": "arith", "source": "reasoning_gym", "path": "basic_arithmetic", "max_samples": 16,
         "eval_samples": 4, "validation_samples": 4, "seed": 2, "eval_seed": 102},
    ]
    recipe.update(max_steps=2, probe_steps=2, probe_updates_weights=False, output_dir=str(tmp_path / "seq"),
                  learning_rate=5e-2, per_device_train_batch_size=2, max_length=200)
    recipe["sequential"] = {
        "pairs": [["sums", "arith"]], "seeds": [0], "methods": _METHODS, "max_new_tokens": 4, "eval_batch_size": 4,
        "bootstrap_reps": 200,
        "grids": {"freeze": {"p": [0.01, 0.05]}, "ewc": {"form": "decoupled", "lambda": [1.0, 100.0]},
                  "lora": {"r": 2, "learning_rate": 1e-2}, "wise_ft": {"base": "none", "alpha": [0.5]},
                  "core_interp": {"alpha_core": 0.0, "alpha_rest": 1.0}, "replay": {"fraction": 0.25}}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_forgetting_benchmark_end_to_end_and_resumes(capsys, tmp_path, tiny_model_dir):
    path = _forgetting_recipe(tmp_path, tiny_model_dir)
    rc, out, err = _run(capsys, "sequential", path)
    assert rc == 0, err
    seq = tmp_path / "seq"
    results = json.loads((seq / "forgetting.json").read_text())
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["none", "freeze p=0.01", "freeze p=0.05", "random_per_tensor", "other_core",
                      "ewc form=decoupled lambda=1", "ewc form=decoupled lambda=100", "lora r=2 learning_rate=0.01",
                      "wise_ft base=none alpha=0.5", "core_interp alpha_core=0 alpha_rest=1", "replay fraction=0.25"]
    a_model = results["a_models"]["sums->arith|0"]
    assert set(a_model) >= {"base", "after_a", "majority", "data", "validation_after_a"}
    assert len(a_model["after_a"]["a"]["scores"]) == 4 and a_model["data"]["sums"]["eval_duplicates_dropped"] >= 0
    for r in results["runs"]:
        assert r["forgetting"] == pytest.approx(r["after_b"]["a"]["accuracy"] - r["after_a"]["a"]["accuracy"])
        assert r["learning"] == pytest.approx(r["after_b"]["b"]["accuracy"] - r["after_a"]["b"]["accuracy"])
        assert len(r["scores"]["a"]) == len(r["scores"]["b"]) == 4 and set(r["validation"]) == {"a", "b"}
        post_hoc = r["method"] in ("wise_ft", "core_interp")
        assert (r["steps"], r["examples"]) == ((0, 0) if post_hoc else (2, 4))
    by = {r["label"]: r for r in results["runs"]}
    # each run measured its own model (a deep copy of a model a Trainer has trained would still compute with the
    # original's weights: the harness copies only a θ_A no Trainer touched)
    nlls = {label: r["after_b"]["b"]["nll"] for label, r in by.items()}
    assert len(set(nlls.values())) == len(nlls) and by["none"]["after_a"]["b"]["nll"] not in nlls.values()
    # the controls froze exactly the core's size; per tensor, exactly its per-tensor counts
    assert by["random_per_tensor"]["frozen_elements"] == by["freeze p=0.05"]["frozen_elements"] > 0
    assert by["freeze p=0.01"]["frozen_elements"] < by["freeze p=0.05"]["frozen_elements"]
    assert by["ewc form=decoupled lambda=1"]["frozen_elements"] == by["none"]["frozen_elements"] == 0
    assert by["lora r=2 learning_rate=0.01"]["trainable_parameters"] < by["none"]["trainable_parameters"]
    assert by["wise_ft base=none alpha=0.5"]["base"] == "none"
    # every p and the EWC weights came from one stored importance of A at θ_A (the trainer's probe path)
    run_dir = seq / "sums-then-arith" / "seed-0"
    assert (run_dir / "probe-sums" / "dpi" / "importance.safetensors").is_file()
    assert (run_dir / "probe-arith" / "dpi" / "importance.safetensors").is_file()  # other_core: B's core at θ_A
    assert (run_dir / "cores" / "core-p0.05" / "dpi" / "importance.safetensors").is_file()
    protected = json.loads((run_dir / "b2" / "freeze_p=0.05" / "dpi" / "protected.json").read_text())
    assert protected["tasks"] == ["sums"]
    # the summary, the table with the command, the plot
    group = results["summary"]["sums->arith | B 2 steps"]
    assert group["seeds"] == [0] and set(group["settings"]) == set(labels)
    assert group["chosen"]["ewc form=decoupled"] in {"ewc form=decoupled lambda=1", "ewc form=decoupled lambda=100"}
    assert results["chosen"]["sums->arith | B 2 steps"] == group["chosen"]
    table = (seq / "results.md").read_text()
    assert f"dpi-hf sequential {path}" in table and "| freeze p=0.05 |" in table and (seq / "pareto.png").is_file()
    # a rerun reuses every finished run (nothing is trained or measured again)
    rc, out, err = _run(capsys, "sequential", path)
    assert rc == 0, err
    assert "[sequential] sums->arith seed 0" not in out  # no model loaded, trained or measured
    assert json.loads((seq / "forgetting.json").read_text())["runs"] == results["runs"]
    # another B length, one method: only its runs are added; the A model is reused from disk
    rc, out, err = _run(capsys, "sequential", path, "--methods", "none", "wise_ft", "--b_steps", "1")
    assert rc == 0, err
    assert "reusing the A model" in out and "training sums" not in out
    runs = json.loads((seq / "forgetting.json").read_text())["runs"]
    assert [(r["label"], r["b_steps"], r["steps"]) for r in runs[len(labels):]] == [
        ("none", 1, 1), ("wise_ft base=none alpha=0.5", 1, 0)]
    # the settings chosen on the validation rows restrict each line of a later run (here: nothing left to run)
    rc, out, err = _run(capsys, "sequential", path, "--best_from", seq / "forgetting.json", "--methods", "ewc")
    assert rc == 0, err
    assert f"ewc form=decoupled: {group['chosen']['ewc form=decoupled']}" in out
    assert "[sequential] sums->arith seed 0" not in out


def test_each_harness_seed_draws_other_rows(tmp_path, tiny_model_dir):
    from dpi_hf.compare.forgetting import load_sequential_recipe
    from dpi_hf.compare.forgetting.runner import SeedRun

    recipe, settings, _ = load_sequential_recipe(_forgetting_recipe(tmp_path, tiny_model_dir))
    rows = []
    for seed in (0, 1):
        run = SeedRun(recipe, settings, settings.pairs[0], seed, tmp_path, {}, None, print)
        run._load_data()
        rows.append({split: run.data["sums"][split]["prompt"] for split in ("train", "eval", "validation")})
    for split in ("train", "eval", "validation"):
        assert rows[0][split] != rows[1][split], split


def test_forgetting_benchmark_bad_input(capsys, tmp_path, tiny_model_dir):
    path = _forgetting_recipe(tmp_path, tiny_model_dir)
    capsys.readouterr()  # the fixture's own output
    rc, _, err = _run(capsys, "sequential", path, "--sequential.grids.ewc.lambda", "[-1]")
    _assert_one_line_error(rc, err, "λ must be a number >= 0")
    rc, _, err = _run(capsys, "sequential", path, "--sequential.grids.ewc.lambda", "[.nan]")
    _assert_one_line_error(rc, err, "λ must be a number >= 0")
    rc, _, err = _run(capsys, "sequential", path, "--sequential.b_learning_rate", ".nan")
    _assert_one_line_error(rc, err, "must be a number > 0")
    rc, _, err = _run(capsys, "sequential", path, "--seeds", "0", "0")  # the CLI's seeds are validated too
    _assert_one_line_error(rc, err, "distinct integers")
    rc, _, err = _run(capsys, "sequential", path, "--sequential.reference_gain", "5")
    _assert_one_line_error(rc, err, "reference_gain must be an accuracy gain in [-1, 1]")
    rc, _, err = _run(capsys, "sequential", path, "--best_pair", "sums->arith")
    _assert_one_line_error(rc, err, "give --best_from")
    rc, _, err = _run(capsys, "sequential", path, "--best_from", tmp_path / "nope.json")
    _assert_one_line_error(rc, err, "does not exist")
    recipe = yaml.safe_load(path.read_text())
    recipe["tasks"][0]["validation_samples"] = 0
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc, _, err = _run(capsys, "sequential", path)
    _assert_one_line_error(rc, err, "task 'sums' has no validation split", "validation_samples")
    assert not (tmp_path / "seq" / "forgetting.json").exists()  # stopped before any work
