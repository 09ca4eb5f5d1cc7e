"""The shared helpers: validation (dpi_hf.utils), the atomic writer (dpi_hf.core.io) and the answer rule."""

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpi_hf.core.errors import DPIConfigError
from dpi_hf.core.io import atomic_save_file, atomic_write_bytes, atomic_write_text
from dpi_hf.utils import check_each_task_once, check_unknown_keys, did_you_mean, is_int, repeated


def test_is_int_accepts_numpy_integers_and_rejects_bools():
    assert is_int(3) and is_int(np.int64(3)) and is_int(np.int32(-1))
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(None)


def test_did_you_mean_and_unknown_keys():
    assert did_you_mean("max_sample", ["max_samples", "seed"]) == " (did you mean 'max_samples'?)"
    assert did_you_mean("zzz", ["max_samples"]) == ""
    with pytest.raises(DPIConfigError, match=r"eval: unknown key 'forgeting' \(did you mean 'forgetting'\?\)"):
        check_unknown_keys({"forgeting": 1}, ["forgetting"], "eval")
    with pytest.raises(DPIConfigError, match="must be a mapping"):
        check_unknown_keys([1], ["a"], "runtime")


def test_each_task_once():
    assert check_each_task_once([["a"], ["b", "c"]], ["a", "b", "c"], "g") == [["a"], ["b", "c"]]
    assert repeated(["a", "b", "a"]) == ["a"]
    with pytest.raises(DPIConfigError, match=r"g names unknown task 'bb' \(did you mean 'b'\?\)"):
        check_each_task_once([["a"], ["bb"]], ["a", "b"], "g")
    with pytest.raises(DPIConfigError, match=r"exactly once; missing \['b'\], repeated \[\]"):
        check_each_task_once([["a"]], ["a", "b"], "g")
    with pytest.raises(DPIConfigError, match=r"repeated \['a'\]"):
        check_each_task_once([["a"], ["a", "b"]], ["a", "b"], "g")
    with pytest.raises(DPIConfigError, match="a group is empty"):
        check_each_task_once([["a", "b"], []], ["a", "b"], "g")


def test_atomic_writes(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(target, b"x")
    assert target.read_bytes() == b"x"
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "t.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f.txt", "sub", "t.safetensors"]  # no temp files left


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_one_answer_rule_for_data_and_evaluation():
    from dpi_hf.data import extract_final_answer as data_rule
    from dpi_hf.evaluation import extract_final_answer as evaluation_rule
    from dpi_hf.evaluation import reasoning_gym_eval
    from dpi_hf.evaluation.answers import extract_final_answer

    # defined once: the data loader, the evaluation package and the verifier use the same function
    assert data_rule is evaluation_rule is reasoning_gym_eval.extract_final_answer is extract_final_answer
    assert data_rule("no marker") is None
    # the verifier scores a completion without a marker whole
    assert reasoning_gym_eval._verifier_answer(" no marker ") == "no marker"
    assert reasoning_gym_eval._verifier_answer("work\n#### 72") == "72"


def test_cli_output_setup_filters_bitsandbytes_noise_and_formats_library_lines(capsys, monkeypatch):
    from dpi_hf.cli.output import setup_output

    library = logging.getLogger("dpi_hf")
    # as in a fresh process: no handler yet (another test may have imported the trainer, which installs one today)
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(library, "propagate", library.propagate)
    monkeypatch.setattr(library, "level", library.level)
    setup_output()
    setup_output()  # idempotent: one handler, one filter
    assert len(library.handlers) == 1
    logging.getLogger("dpi_hf.test").info("hello")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
    err = capsys.readouterr().err
    assert "[dpi-hf] hello" in err and "gemm_4bit_forward" not in err
