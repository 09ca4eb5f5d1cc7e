"""The protect-an-existing-skill workflow from the command line, and the sequential scenario (`dpi-hf sequential`)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import _assert_one_line_error, _run, _tiny_recipe, tiny_model_dir  # noqa: F401  (fixture)

from dpi_hf import load_cores
from dpi_hf.compare.sequential import SequentialSettings, summarize


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


def _sequential_recipe(tmp_path, model_dir):
    path = _tiny_recipe(tmp_path, model_dir)
    recipe = yaml.safe_load(path.read_text())
    for k in ("core_fraction", "jaccard_threshold"):
        recipe.pop(k)
    recipe.update(max_steps=3, probe_steps=2, output_dir=str(tmp_path / "seq"), learning_rate=5e-2)
    recipe["sequential"] = {"pairs": [["add", "rev"]], "signals": ["fisher", "update"], "core_fractions": [0.05],
                            "seeds": [0, 1], "nll_samples": 4}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_sequential_scenario_end_to_end(capsys, tmp_path, tiny_model_dir):
    path = _sequential_recipe(tmp_path, tiny_model_dir)
    rc, out, err = _run(capsys, "sequential", path)
    assert rc == 0, err
    seq = tmp_path / "seq"
    results = json.loads((seq / "sequential.json").read_text())
    conditions = ["none", "fisher 5%", "update 5%", "fisher-nostep 5%", "random 5%"]
    assert [r["condition"] for r in results["runs"] if r["seed"] == 0] == conditions
    assert sorted({r["seed"] for r in results["runs"]}) == [0, 1]
    for r in results["runs"]:
        assert r["forgetting"] == pytest.approx(r["nll_a"] - r["nll_a_after_a"])
        assert r["learning"] == pytest.approx(r["nll_b_after_a"] - r["nll_b"])
        assert r["steps"] == 3
    # every protected condition froze the same number of elements (the random control is the same size)
    sizes = {r["elements"] for r in results["runs"] if r["condition"] != "none"}
    assert len(sizes) == 1 and sizes.pop() > 0
    # each protected run's cores file was written on the A model and protected through the product path
    for cond in ("fisher-5pct", "random-5pct"):
        record = json.loads((seq / "add-then-rev" / "seed-0" / "b" / cond / "dpi" / "protected.json").read_text())
        assert record["tasks"] == ["add"] and record["source"].endswith(cond)
    assert "### add → rev (2 seeds" in out and (seq / "sequential.png").is_file()
    # a rerun reuses every finished run (nothing trains again)
    mtime = (seq / "sequential.json").stat().st_mtime_ns
    rc, out, err = _run(capsys, "sequential", path)
    assert rc == 0 and "training add" not in out
    assert json.loads((seq / "sequential.json").read_text())["runs"] == results["runs"]
    assert (seq / "sequential.json").stat().st_mtime_ns >= mtime


def test_sequential_summary_by_hand():
    runs = [
        {"pair": "a->b", "seed": s, "condition": c, "signal": sig, "core_fraction": p, "elements": 10,
         "nll_a_after_a": 1.0, "nll_b_after_a": 2.0, "nll_a": 1.0 + f, "nll_b": nb, "forgetting": f,
         "learning": 2.0 - nb, "seconds_per_step": 1.0}
        for s, c, sig, p, f, nb in [
            (0, "none", None, None, 0.10, 1.50), (0, "fisher 5%", "fisher", 0.05, 0.04, 1.52),
            (1, "none", None, None, 0.20, 1.40), (1, "fisher 5%", "fisher", 0.05, 0.05, 1.46),
            (0, "random 5%", "random", 0.05, 0.09, 1.50), (1, "random 5%", "random", 0.05, 0.18, 1.40),
        ]
    ]
    summary = summarize(runs)["a->b"]
    s = summary["fisher 5%"]
    # pooled: 1 - mean F / mean F_none = 1 - 0.045 / 0.15 (fisher) and 1 - 0.135 / 0.15 (random)
    assert s["pooled_share_removed"] == pytest.approx(0.7)
    assert summary["random 5%"]["pooled_share_removed"] == pytest.approx(0.1)
    assert s["vs_random"] == pytest.approx(7.0) and summary["random 5%"]["vs_random"] is None
    assert s["share_removed"]["n"] == 2
    assert s["share_removed"]["values"] == pytest.approx([0.6, 0.75])
    assert s["share_removed"]["mean"] == pytest.approx(0.675)
    assert s["share_removed"]["std"] == pytest.approx(0.10606601717798213)
    assert s["cost"]["values"] == pytest.approx([0.02, 0.06])


def test_sequential_settings_errors():
    from dpi_hf import DPIConfigError

    with pytest.raises(DPIConfigError, match="not tasks of the recipe"):
        SequentialSettings.from_dict({"pairs": [["a", "zzz"]]}, ["a", "b"])
    with pytest.raises(DPIConfigError, match="pair of two different"):
        SequentialSettings.from_dict({"pairs": [["a", "a"]]}, ["a", "b"])
    with pytest.raises(DPIConfigError, match="unknown key"):
        SequentialSettings.from_dict({"seedz": [1]}, ["a", "b"])
    with pytest.raises(DPIConfigError, match="core_fraction"):
        SequentialSettings.from_dict({"core_fractions": [5]}, ["a", "b"])
    assert SequentialSettings.from_dict(None, ["a", "b", "c"]).pairs == [["a", "b"]]
