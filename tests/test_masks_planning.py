"""CoreMask algebra, stage planning on hand-computed examples, and the cores file format."""

import json

import numpy as np
import pytest
import torch

from dpi_hf import (
    CoreMask,
    DPIConfigError,
    FingerprintMismatchError,
    MaskFileError,
    StagePlan,
    load_cores,
    model_fingerprint,
    plan_stages,
    read_cores_metadata,
    save_cores,
)
from dpi_hf.core.planning import plan_from_groups

SHAPES = {"a": (4, 5), "b": (10,)}


def mask(a=(), b=(), encoding="auto"):
    return CoreMask.from_indices({"a": torch.tensor(a, dtype=torch.long), "b": torch.tensor(b, dtype=torch.long)},
                                 SHAPES, encoding=encoding)


# ------------------------------------------------------------------------------------------------------ CoreMask
@pytest.mark.parametrize("encoding", ["indices", "bitmask", "auto"])
def test_mask_basic_queries(encoding):
    m = mask([0, 7, 19, 7], [3], encoding=encoding)
    assert m.names() == ["a", "b"]
    assert m.count() == 4 and m.count("a") == 3 and m.numel() == 30
    assert m.fraction() == pytest.approx(4 / 30)
    assert m.indices("a").tolist() == [0, 7, 19]
    d = m.dense("a")
    assert d.shape == (4, 5) and d.dtype == torch.bool and d.sum() == 3 and d[1, 2] and d[3, 4]
    assert m.encoding("a") == (encoding if encoding != "auto" else m.encoding("a"))


def test_auto_encoding_picks_smaller():
    big = {"w": (1000,)}
    sparse = CoreMask.from_indices({"w": torch.arange(10)}, big)  # 40 B of int32 vs 125 B of bits
    dense = CoreMask.from_indices({"w": torch.arange(500)}, big)  # 2000 B of int32 vs 125 B of bits
    assert sparse.encoding("w") == "indices" and sparse.nbytes() == 40
    assert dense.encoding("w") == "bitmask" and dense.nbytes() == 125
    assert dense.indices("w").tolist() == list(range(500))


@pytest.mark.parametrize("ea,eb", [("indices", "indices"), ("bitmask", "indices"), ("bitmask", "bitmask")])
def test_union_intersection_jaccard_hand_computed(ea, eb):
    x = mask([0, 1, 2, 3], [0, 1], encoding=ea)  # 6 elements
    y = mask([2, 3, 4], [1, 2, 3], encoding=eb)  # 6 elements
    # ∩ = a{2,3} b{1} → 3 ; ∪ = 6 + 6 - 3 = 9
    assert x.intersection(y).count() == 3
    assert x.intersection_count(y) == 3
    assert x.union(y).count() == 9
    assert x.union(y).indices("b").tolist() == [0, 1, 2, 3]
    assert x.jaccard(y) == pytest.approx(3 / 9)
    assert y.jaccard(x) == pytest.approx(3 / 9)
    assert x.jaccard(x) == 1.0
    assert mask().jaccard(mask()) == 0.0


def test_equality_ignores_encoding():
    assert mask([1, 2], [3], encoding="indices") == mask([1, 2], [3], encoding="bitmask")
    assert mask([1, 2]) != mask([1, 3])


def test_mask_bad_input():
    with pytest.raises(DPIConfigError, match="outside its shape"):
        CoreMask.from_indices({"a": torch.tensor([20])}, {"a": (4, 5)})
    with pytest.raises(DPIConfigError, match="without a shape"):
        CoreMask.from_indices({"zz": torch.tensor([0])}, {"a": (4, 5)})
    other = CoreMask.from_indices({}, {"a": (5, 4), "b": (10,)})
    with pytest.raises(DPIConfigError, match="different models"):
        mask([1]).union(other)
    with pytest.raises(DPIConfigError, match="not covered"):
        mask().dense("nope")


# ------------------------------------------------------------------------------------------------------ planning
def line_cores():
    # four tasks over 20 + 10 elements: A~B overlap strongly, C alone, D overlaps C weakly
    return {
        "A": mask([0, 1, 2, 3]),  # 4
        "B": mask([1, 2, 3, 4]),  # J(A,B) = 3/5 = 0.6
        "C": mask([10, 11, 12, 13]),  # J(A,C) = 0
        "D": mask([13, 14, 15, 16, 17]),  # J(C,D) = 1/8 = 0.125
    }


def test_plan_hand_computed():
    plan = plan_stages(line_cores(), jaccard_threshold=0.1)
    assert plan.tasks == ["A", "B", "C", "D"]
    assert plan.jaccard[0][1] == pytest.approx(0.6)
    assert plan.jaccard[2][3] == pytest.approx(0.125)
    assert plan.jaccard[0][2] == 0.0
    assert plan.groups == [["A", "B"], ["C", "D"]]
    assert plan.stages == [["A", "B"], ["C", "D"]]
    # stage 0 freezes nothing; stage 1 freezes C_A ∪ C_B = {0..4}
    assert plan.frozen_counts == [0, 5]
    assert plan.frozen_before(1).indices("a").tolist() == [0, 1, 2, 3, 4]
    assert plan.total_elements == 30 and plan.core_counts == {"A": 4, "B": 4, "C": 4, "D": 5}

    plan = plan_stages(line_cores(), jaccard_threshold=0.2)
    assert plan.groups == [["A", "B"], ["C"], ["D"]]
    # stage 2 (D) freezes A ∪ B ∪ C = 5 + 4
    assert plan.frozen_counts == [0, 5, 9]


def test_tau_edge_cases():
    assert plan_stages(line_cores(), jaccard_threshold=0.0).stages == [["A", "B", "C", "D"]]
    plan = plan_stages(line_cores(), jaccard_threshold=1.0)
    assert plan.stages == [["A"], ["B"], ["C"], ["D"]]
    same = {"X": mask([1, 2]), "Y": mask([1, 2])}
    assert plan_stages(same, jaccard_threshold=1.0).stages == [["X", "Y"]]


def test_stage_orders():
    cores = line_cores()
    sizes = {"A": 1, "B": 1, "C": 5, "D": 5}
    assert plan_stages(cores, 0.1, order="largest_first", sizes=sizes).stages == [["C", "D"], ["A", "B"]]
    # without sizes, ties on group size keep first appearance
    assert plan_stages(cores, 0.1, order="largest_first").stages == [["A", "B"], ["C", "D"]]
    r1 = plan_stages(cores, 1.0, order="random", seed=3).stages
    assert r1 == plan_stages(cores, 1.0, order="random", seed=3).stages
    assert sorted(map(tuple, r1)) == [("A",), ("B",), ("C",), ("D",)]
    assert any(plan_stages(cores, 1.0, order="random", seed=s).stages != r1 for s in range(10))


def test_plan_json_round_trip():
    plan = plan_stages(line_cores(), 0.1)
    text = plan.to_json(core_fraction=0.01)
    assert json.loads(text)["core_fraction"] == 0.01
    back = StagePlan.from_json(text)
    assert back == plan
    with pytest.raises(DPIConfigError, match="no cores attached"):
        back.frozen_before(1)
    assert back.attach_cores(line_cores()).frozen_before(1) == plan.frozen_before(1)
    with pytest.raises(DPIConfigError, match="not valid JSON"):
        StagePlan.from_json("{oops")
    with pytest.raises(DPIConfigError, match="not a valid DPI plan"):
        StagePlan.from_json('{"tasks": []}')


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan"), "x"])
def test_plan_bad_threshold(tau):
    with pytest.raises(DPIConfigError, match="jaccard_threshold"):
        plan_stages(line_cores(), tau)


def test_plan_bad_tasks_and_order():
    with pytest.raises(DPIConfigError, match="unknown task names"):
        plan_stages(line_cores(), 0.1, tasks=["A", "Q"])
    with pytest.raises(DPIConfigError, match="no tasks"):
        plan_stages({}, 0.1)
    with pytest.raises(DPIConfigError, match="stage_order|order="):
        plan_stages(line_cores(), 0.1, order="sideways")


def test_plan_from_groups_baselines():
    plan = plan_from_groups(line_cores(), [["C"], ["A", "B", "D"]], freeze=False)
    assert plan.stages == [["C"], ["A", "B", "D"]] and plan.frozen_counts == [0, 0]
    nocores = plan_from_groups(None, [["A"], ["B"]], freeze=False)
    assert nocores.stages == [["A"], ["B"]]
    with pytest.raises(DPIConfigError, match="exactly once"):
        plan_from_groups(None, [["A"], ["A"]], freeze=False, tasks=["A", "B"])
    with pytest.raises(DPIConfigError, match="needs the tasks' cores"):
        plan_from_groups(None, [["A"], ["B"]], freeze=True)


# ------------------------------------------------------------------------------------------------------ storage
def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def model_cores(model, enc):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    out = {}
    for t, k in [("math", 3), ("code", 60)]:
        out[t] = CoreMask.from_indices(
            {n: torch.randperm(int(np.prod(s)), generator=g)[: min(k, int(np.prod(s)))] for n, s in shapes.items()},
            shapes, encoding=enc)
    return out


@pytest.mark.parametrize("enc", ["indices", "bitmask", "auto"])
def test_save_load_round_trip(tmp_path, enc):
    model = tiny_model()
    cores = model_cores(model, enc)
    path = save_cores(cores, tmp_path / "dpi" / "cores.safetensors", model=model, core_fraction=0.01, scope="global")
    back = load_cores(path, model=model)
    assert list(back) == ["math", "code"]
    for t in cores:
        assert back[t] == cores[t]
    meta = read_cores_metadata(path)
    assert meta["core_fraction"] == 0.01 and meta["scope"] == "global" and meta["tasks"] == ["math", "code"]
    assert meta["fingerprint"] == model_fingerprint(model)
    assert list(load_cores(path, tasks=["code"])) == ["code"]
    with pytest.raises(DPIConfigError, match="not in"):
        load_cores(path, tasks=["chat"])


def test_fingerprint_mismatch_names_parameter(tmp_path):
    model = tiny_model()
    path = save_cores(model_cores(model, "auto"), tmp_path / "c.safetensors", model=model)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    with pytest.raises(FingerprintMismatchError, match=r"'2\.weight'"):
        load_cores(path, model=other)
    renamed = torch.nn.Sequential(torch.nn.Linear(8, 16))
    with pytest.raises(FingerprintMismatchError, match="does not have"):
        load_cores(path, model=renamed)


def test_truncated_and_corrupt_files(tmp_path):
    model = tiny_model()
    path = save_cores(model_cores(model, "indices"), tmp_path / "c.safetensors", model=model)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(MaskFileError, match="truncated or corrupt"):
            load_cores(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(MaskFileError):
        load_cores(junk)
    with pytest.raises(MaskFileError, match="does not exist"):
        load_cores(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MaskFileError, match="not a dpi-hf cores file"):
        load_cores(tmp_path / "plain.safetensors")


def test_save_refuses_bad_input_and_writes_nothing(tmp_path):
    target = tmp_path / "c.safetensors"
    with pytest.raises(DPIConfigError, match="non-empty dict"):
        save_cores({}, target)
    with pytest.raises(DPIConfigError, match="not a CoreMask"):
        save_cores({"a": "nope"}, target)
    with pytest.raises(DPIConfigError, match="JSON-serialisable"):
        save_cores({"a": mask([1])}, target, extra=object())
    assert not target.exists() and list(tmp_path.iterdir()) == []
