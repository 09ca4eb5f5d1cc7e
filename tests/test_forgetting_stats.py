"""The forgetting benchmark's statistics and settings, by hand: bootstrap intervals paired by seed and row,
matched-gain interpolation, the Pareto front, the validation choice, the summary and the grids."""

import numpy as np
import pytest

from dpi_hf import DPIConfigError
from dpi_hf.compare.forgetting import ForgettingSettings, Setting, chosen_settings
from dpi_hf.compare.forgetting.report import effect, format_table
from dpi_hf.compare.forgetting.stats import (Bootstrap, choose_settings, interpolate_at, matched_forgetting,
                                             pareto_front)
from dpi_hf.compare.forgetting.summary import summarize

# --- bootstrap ---------------------------------------------------------------------------------------------------------


def test_bootstrap_of_two_rows_by_hand():
    # one seed, rows [0, 1]: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1
    b = Bootstrap({0: {"a": 2}}, reps=4000, seed=1)
    i = b.interval("a", {0: np.array([0.0, 1.0])})
    assert (i.mean, i.lo, i.hi, i.n_seeds) == (0.5, 0.0, 1.0, 1)
    means = b.replicates("a", {0: np.array([0.0, 1.0])})
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.03)


def test_bootstrap_resamples_the_seeds():
    # two seeds, constant within each: only the seed resampling varies the mean (0, 0.5 or 1)
    b = Bootstrap({0: {"a": 3}, 1: {"a": 3}}, reps=4000, seed=2)
    i = b.interval("a", {0: np.zeros(3), 1: np.ones(3)})
    assert (i.mean, i.lo, i.hi) == (0.5, 0.0, 1.0)
    assert np.mean(b.replicates("a", {0: np.zeros(3), 1: np.ones(3)}) == 0.5) == pytest.approx(0.5, abs=0.03)


def test_paired_difference_uses_the_same_rows_on_both_sides():
    rng = np.random.default_rng(0)
    none = {s: rng.integers(0, 2, 50).astype(float) for s in range(3)}
    method = {s: v + 0.1 for s, v in none.items()}  # 0.1 better on every row of every seed
    b = Bootstrap({s: {"a": 50} for s in range(3)}, reps=500)
    diff = b.interval("a", {s: method[s] - none[s] for s in range(3)})
    assert diff.mean == pytest.approx(0.1) and diff.lo == pytest.approx(0.1) and diff.hi == pytest.approx(0.1)
    # unpaired, the two intervals overlap widely: the pairing is what makes the 0.1 visible
    lo_m, hi_none = b.interval("a", method).lo, b.interval("a", none).hi
    assert lo_m < hi_none
    # the same resample for both replicate vectors: their difference is the paired one
    assert np.allclose(b.replicates("a", method) - b.replicates("a", none), 0.1)


def test_effect_printing():
    assert effect({"mean": 0.02, "lo": -0.01, "hi": 0.05}) == "no difference [-0.010, +0.050]"
    assert effect({"mean": 0.0, "lo": 0.0, "hi": 0.0}) == "no difference [+0.000, +0.000]"
    assert effect({"mean": -0.2, "lo": -0.3, "hi": -0.1}) == "-0.200 [-0.300, -0.100]"
    assert "%" not in effect({"mean": 0.5, "lo": 0.4, "hi": 0.6})


# --- matched gain, Pareto front, validation choice -------------------------------------------------------------------


def test_interpolate_at_matched_gain():
    assert interpolate_at([0.1, 0.3], [-0.2, -0.4], 0.2) == pytest.approx(-0.3)
    assert interpolate_at([0.3, 0.1, 0.2], [-0.4, -0.2, -0.1], 0.15) == pytest.approx(-0.15)  # sorted by gain
    assert interpolate_at([0.1, 0.1, 0.3], [-0.2, -0.4, -0.5], 0.1) == pytest.approx(-0.3)  # same gain averaged
    assert interpolate_at([0.1, 0.3], [-0.2, -0.4], 0.35) is None  # no extrapolation
    assert interpolate_at([0.2], [-0.1], 0.2) == pytest.approx(-0.1)
    assert interpolate_at([], [], 0.0) is None


def test_matched_forgetting_with_replicates():
    # two settings; columns: the point, then three replicates; the third replicate's reference is out of range
    gains = np.array([[0.1, 0.1, 0.0, 0.1], [0.3, 0.3, 0.2, 0.2]])
    forgets = np.array([[-0.2, -0.2, -0.1, -0.2], [-0.4, -0.6, -0.3, -0.4]])
    reference = np.array([0.2, 0.2, 0.1, 0.5])
    m = matched_forgetting(gains, forgets, reference)
    assert m["forgetting"] == pytest.approx(-0.3)
    assert np.allclose(m["replicates"][:2], [-0.4, -0.2]) and np.isnan(m["replicates"][2])
    assert m["defined"] == pytest.approx(2 / 3) and m["lo"] is None  # reached in < 95 % of the replicates
    assert matched_forgetting(gains, forgets, np.array([0.9, 0.2, 0.1, 0.2])) is None


def test_pareto_front():
    points = [(0.5, 0.1), (0.4, 0.2), (0.3, 0.05), (0.5, 0.1), (0.2, 0.2)]
    assert pareto_front(points) == [True, True, False, True, False]


def test_choose_settings_prefers_the_best_validation_then_grid_order():
    scores = {"ewc form=loss": {"a": 0.2, "b": 0.5, "c": 0.5}, "none": {"none": 0.1}, "empty": {}}
    assert choose_settings(scores) == {"ewc form=loss": "b", "none": "none"}


# --- the summary of hand-made runs -----------------------------------------------------------------------------------


def _a_model(after_a, validation=(0.5, 0.0)):
    return {"after_a": {r: {"accuracy": float(np.mean(v)), "nll": 1.0, "scores": list(v)} for r, v in after_a.items()},
            "validation_after_a": {"a": validation[0], "b": validation[1]},
            "base": {"a": {"accuracy": 0.0, "nll": 2.0}, "b": {"accuracy": 0.0, "nll": 2.0}},
            "majority": {"a": {"accuracy": 0.1}, "b": {"accuracy": 0.05}}, "data": {"x": {}, "y": {}}}


def _run(seed, setting, a_scores, b_scores, validation):
    return {"pair": "x->y", "a": "x", "b": "y", "seed": seed, "b_steps": 2, "method": setting.method,
            "setting": setting.values, "label": setting.label, "line": setting.line,
            "scores": {"a": list(a_scores), "b": list(b_scores)},
            "after_a": {r: {"accuracy": 0.0, "nll": 1.0} for r in "ab"},
            "after_b": {"a": {"accuracy": float(np.mean(a_scores)), "nll": 1.5},
                        "b": {"accuracy": float(np.mean(b_scores)), "nll": 0.5}},
            "validation": {"a": validation[0], "b": validation[1]}, "seconds": 1.0, "examples": 4}


def test_summary_by_hand():
    ones, zeros = [1.0] * 4, [0.0] * 4
    a_models = {f"x->y|{s}": _a_model({"a": ones, "b": zeros}) for s in (0, 1)}
    ewc = [Setting("ewc", (("form", "loss"), ("lambda", lam))) for lam in (1.0, 10.0)]
    runs = []
    for s in (0, 1):
        runs.append(_run(s, Setting("none"), [0, 0, 1, 0], [1, 1, 1, 0], (0.1, 0.7)))  # forgets 0.75, learns 0.75
        runs.append(_run(s, ewc[0], [1, 0, 1, 0], [1, 1, 1, 1], (0.4, 0.8)))  # forgets 0.5, learns 1.0
        runs.append(_run(s, ewc[1], [1, 1, 1, 1], [1, 0, 0, 0], (0.9, 0.2)))  # forgets 0, learns 0.25
    summary = summarize({"runs": runs, "a_models": a_models}, reps=300)
    g = summary["x->y | B 2 steps"]
    assert g["seeds"] == [0, 1] and g["rows"] == {"a": 4, "b": 4} and g["after_a"] == {"a": 1.0, "b": 0.0}
    none, loose, tight = (g["settings"][k] for k in ("none", ewc[0].label, ewc[1].label))
    assert none["forgetting"]["mean"] == pytest.approx(-0.75) and none["learning"]["mean"] == pytest.approx(0.75)
    assert loose["vs_none"]["forgetting"]["mean"] == pytest.approx(0.25)
    assert loose["vs_none"]["learning"]["mean"] == pytest.approx(0.25)
    assert tight["vs_none"]["forgetting"]["mean"] == pytest.approx(0.75)
    assert none["vs_none"]["forgetting"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n_seeds": 2}
    # matched gain: along the EWC line (gains 0.25 and 1.0; forgettings 0 and -0.5), at none's gain 0.75
    line = g["lines"]["ewc form=loss"]
    assert line["matched"]["forgetting"] == pytest.approx(-0.5 * (0.75 - 0.25) / 0.75)
    assert g["reference_gain"] == pytest.approx(0.75)
    # validation: the average of the two tasks' validation accuracy; 1.0 scores (0.4+0.8)/2 = 0.6 > (0.9+0.2)/2
    assert line["chosen"] == ewc[0].label and g["chosen"]["ewc form=loss"] == ewc[0].label
    # front: (A kept, B gain) = none (0.25, 0.75), loose (0.5, 1.0), tight (1.0, 0.25): none is dominated
    assert [none["pareto"], loose["pareto"], tight["pareto"]] == [False, True, True]
    table = format_table({"command": "dpi-hf sequential r.yaml", "summary": summary, "settings": {}})
    assert "dpi-hf sequential r.yaml" in table and "## x → y, B for 2 steps (2 seeds, 4 + 4 eval rows" in table
    tight_row = next(r for r in table.splitlines() if r.startswith(f"| {ewc[1].label} |"))
    assert tight_row.split(" | ")[5].startswith("+0.750 [")  # forgetting vs none: an effect, with its interval
    assert chosen_settings({"chosen": summary and {k: v["chosen"] for k, v in summary.items()}}) == (
        "x->y | B 2 steps", g["chosen"])


# --- the settings ----------------------------------------------------------------------------------------------------


def test_grids_labels_lines_and_union():
    s = ForgettingSettings.from_dict({"methods": ["none", "ewc", "lora", "wise_ft"], "grids": {
        "ewc": [{"form": "loss", "lambda": [1, "1e2"]}, {"form": "decoupled", "lambda": [10]}],
        "lora": {"r": 8, "learning_rate": ["1e-4", 3e-4]}}}, ["a", "b"])
    assert [x.label for x in s.all_settings()] == [
        "none", "ewc form=loss lambda=1", "ewc form=loss lambda=100", "ewc form=decoupled lambda=10",
        "lora r=8 learning_rate=0.0001", "lora r=8 learning_rate=0.0003",
        "wise_ft base=none alpha=0.1", "wise_ft base=none alpha=0.25", "wise_ft base=none alpha=0.5",
        "wise_ft base=none alpha=0.75", "wise_ft base=freeze alpha=0.1", "wise_ft base=freeze alpha=0.25",
        "wise_ft base=freeze alpha=0.5", "wise_ft base=freeze alpha=0.75"]
    assert {x.line for x in s.settings("ewc")} == {"ewc form=loss", "ewc form=decoupled"}
    assert s.pairs[0].name == "a->b" and s.b_lengths(16) == [16]
    s.keep_only({"ewc form=loss": "ewc form=loss lambda=100", "lora r=8": "lora r=8 learning_rate=0.0003"})
    assert [x.label for x in s.settings("ewc")] == ["ewc form=loss lambda=100", "ewc form=decoupled lambda=10"]
    assert [x.label for x in s.settings("lora")] == ["lora r=8 learning_rate=0.0003"]
    with pytest.raises(DPIConfigError, match="not in the grid of 'ewc'"):
        s.keep_only({"ewc form=loss": "ewc form=loss lambda=5"})


def test_pair_entries_with_their_own_rates():
    s = ForgettingSettings.from_dict({"pairs": [{"pair": ["a", "b"], "b_learning_rate": 3e-5, "control_task": "c"},
                                                ["b", "a"]], "b_steps": 32}, ["a", "b", "c"])
    assert (s.pairs[0].b_learning_rate, s.pairs[0].control_task, s.pairs[1].name) == (3e-5, "c", "b->a")
    assert s.b_steps == [32]


@pytest.mark.parametrize("section, message", [
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"methods": ["ewcc"]}, "did you mean 'ewc'"),
    ({"grids": {"none": {}}}, "which have no grid"),
    ({"grids": {"ewc": {"lamda": [1]}}}, "unknown key 'lamda'"),
    ({"grids": {"ewc": {"lambda": [-1]}}}, "λ must be a number >= 0"),
    ({"grids": {"ewc": {"form": ["soft"]}}}, "'loss' or 'decoupled'"),
    ({"grids": {"wise_ft": {"alpha": [1.5]}}}, r"α must be in \[0, 1\]"),
    ({"grids": {"wise_ft": {"base": ["lora"]}}}, "is not 'none'"),
    ({"grids": {"replay": {"fraction": [1.0]}}}, r"must be in \(0, 1\)"),
    ({"grids": {"freeze": {"p": []}}}, "is empty"),
    ({"pairs": [["a", "zzz"]]}, "not tasks of the recipe"),
    ({"pairs": [["a", "a"]]}, "pair of two different"),
    ({"pairs": [{"pair": ["a", "b"], "lr": 1}]}, "unknown key 'lr'"),
    ({"control_task": "zzz"}, "control_task 'zzz'"),
    ({"seedz": [1]}, "unknown key"),
    ({"seeds": []}, "non-empty list of distinct integers"),
    ({"seeds": [1, 1]}, "non-empty list of distinct integers"),
    ({"b_steps": [0]}, "b_steps must be a positive integer"),
    ({"reference_fraction": 5}, "core fraction p must be in"),
    ({"eval_rows": 0}, "eval_rows must be a positive integer or null"),
])
def test_settings_errors(section, message):
    with pytest.raises(DPIConfigError, match=message):
        ForgettingSettings.from_dict(section, ["a", "b", "c"])
