"""CPI-FT fusion engine: SLERP, sequential k-model SLERP, core transplant with overlap resolution, lazy reads."""

import math
import weakref

import pytest
import torch
from safetensors.torch import save_file

from dpi_hf.core import CoreMask, DPIConfigError
from dpi_hf.core import fusion
from dpi_hf.core.fusion import (
    COLINEAR_COS,
    TransplantMap,
    core_importance,
    fuse_models,
    group_core_importance,
    merge_task_vectors,
    slerp,
)

R2 = math.sqrt(2) / 2
THETA0 = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.75])


def _save(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _core(name_to_idx, shapes):
    return CoreMask.from_indices({n: torch.tensor(i, dtype=torch.int64) for n, i in name_to_idx.items()}, shapes)


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


# --------------------------------------------------------------------------------------------------------- slerp
def test_slerp_orthogonal_by_hand():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    # θ = π/2: weights sin((1−t)θ)/sin θ and sin(tθ)/sin θ
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([3 * R2, 3 * R2]), atol=1e-6)
    s8, c8 = math.sin(math.pi / 8), math.cos(math.pi / 8)
    assert torch.allclose(slerp(a, b, 0.25), torch.tensor([3 * c8, 3 * s8]), atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    # 60°: t = 1/2 lands on the bisector with the interpolated length of equal-norm vectors (norm kept)
    u, w = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    mid = slerp(u, w, 0.5)
    assert torch.allclose(mid, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_slerp_colinear_falls_back_to_lerp():
    v = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(slerp(v, 2 * v, 0.25), v * 0.75 + (2 * v) * 0.25)
    # nearly parallel: |cos| just above the threshold still interpolates linearly
    w = v + torch.tensor([0.0, 0.0, 1e-3])
    cos = float(torch.dot(v, w) / (v.norm() * w.norm()))
    assert cos > COLINEAR_COS
    assert torch.equal(slerp(v, w, 0.5), v * 0.5 + w * 0.5)


def test_slerp_antiparallel_and_zero_vectors_are_defined():
    v = torch.tensor([1.0, 2.0, -3.0])
    out = slerp(v, -v, 0.5)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(3))
    assert torch.equal(slerp(v, -2 * v, 0.25), v * 0.75 + (-2 * v) * 0.25)
    z = torch.zeros(3)
    assert torch.equal(slerp(z, v, 0.3), v * 0.3)  # one zero vector: the linear interpolation
    assert torch.equal(slerp(v, z, 0.3), v * 0.7)
    assert torch.equal(slerp(z, z, 0.5), z)


def test_slerp_keeps_dtype_and_shape_and_refuses_bad_input():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.bfloat16)
    out = slerp(a, b, 0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2)
    assert torch.equal(out, torch.tensor([[R2, R2], [0.0, 0.0]]).to(torch.bfloat16))
    with pytest.raises(DPIConfigError, match="NaN or inf"):
        slerp(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 0.0]), 0.5)
    with pytest.raises(DPIConfigError, match=r"t=1.5 must be in \[0, 1\]"):
        slerp(torch.ones(2), torch.ones(2), 1.5)
    with pytest.raises(DPIConfigError, match="same size"):
        slerp(torch.ones(2), torch.ones(3), 0.5)


def test_merge_task_vectors_sequential_weights_by_hand():
    e = torch.eye(4)
    # sizes 1, 1, 2: m2 = slerp(e1, e2, 1/2) = (e1 + e2)/√2 (unit), m3 = slerp(m2, e3, 2/4) = (m2 + e3)/√2
    m = merge_task_vectors([e[0], e[1], e[2]], [1, 1, 2])
    assert torch.allclose(m, torch.tensor([0.5, 0.5, R2, 0.0]), atol=1e-6)
    # parallel vectors: exactly the data-size-weighted average, whatever the order
    v = torch.tensor([1.0, 2.0])
    assert torch.allclose(merge_task_vectors([v, 3 * v, 5 * v], [1, 2, 1]), v * (1 + 6 + 5) / 4)
    assert torch.allclose(merge_task_vectors([5 * v, v, 3 * v], [1, 1, 2]), v * (1 + 6 + 5) / 4)
    with pytest.raises(DPIConfigError, match="positive integers"):
        merge_task_vectors([v, v], [1, 0])


# --------------------------------------------------------------------------------------------------------- fusion
def test_two_groups_transplant_exact_and_slerp_elsewhere(tmp_path):
    shapes = {"w": (2, 3)}
    theta0 = {"w": THETA0.reshape(2, 3)}
    ta = torch.tensor([3.0, 4.0, 0, 0, 0, 0])  # |τA| = 5
    tb = torch.tensor([0, 0, 0, 0, 5.0, 0])  # |τB| = 5, orthogonal to τA
    fa = _save(tmp_path, "a", {"w": (THETA0 + ta).reshape(2, 3)})
    fb = _save(tmp_path, "b", {"w": (THETA0 + tb).reshape(2, 3)})
    cores = [_core({"w": [1]}, shapes), _core({"w": [4]}, shapes)]
    fused, tmap = fuse_models(theta0, [fa, fb], cores, [1, 3], groups=[["a"], ["b"]])
    w = fused["w"].reshape(-1)
    # cores: each group's model, bit for bit
    assert _bits(w[1:2]).tolist() == _bits((THETA0 + ta)[1:2]).tolist()
    assert _bits(w[4:5]).tolist() == _bits((THETA0 + tb)[4:5]).tolist()
    # elsewhere: θ0 + slerp(τA, τB, t = 3/4); θ = π/2, so the weights are sin(π/8) and sin(3π/8)
    s, c = math.sin(math.pi / 8), math.sin(3 * math.pi / 8)
    expected = THETA0 + s * ta + c * tb
    rest = [0, 2, 3, 5]
    assert torch.allclose(w[rest], expected[rest], atol=1e-6)
    assert abs(float(w[0]) - (0.5 + 3 * s)) < 1e-6 and float(w[5]) == -0.75
    assert tmap.owned(0) == cores[0] and tmap.owned(1) == cores[1] and tmap.contested == 0
    assert tmap.summary() == {"groups": [["a"], ["b"]], "owned": [1, 1], "contested": 0, "resolved_by": "update"}
    # λ scales the merged task vector on the non-core elements only
    half, _ = fuse_models(theta0, [fa, fb], cores, [1, 3], factor=0.5)
    h = half["w"].reshape(-1)
    assert torch.allclose(h[rest], (THETA0 + 0.5 * (s * ta + c * tb))[rest], atol=1e-6)
    assert torch.equal(h[[1, 4]], w[[1, 4]])


def _reference_slerp(a, b, t):
    """An independent float64 SLERP for checking the engine on tensors without a closed form."""
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    cos = float(torch.dot(a, b) / (na * nb))
    if abs(cos) > COLINEAR_COS:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_three_groups_by_hand_with_a_merged_group_and_bf16(tmp_path):
    shapes = {"w": (4,), "c": (6,)}
    t0w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t0c = torch.tensor([0.5, 0.25, -0.5, 1.0, 2.0, -1.0], dtype=torch.bfloat16)
    theta0 = {"w": t0w, "c": t0c}
    e = torch.eye(4)
    tc = [torch.tensor(v) for v in ([1.0, 0.5, 0, 0, 0.25, 0], [0, 0.5, 2.0, 0, 0, -0.5])]
    files = []
    for g in range(2):
        c = (t0c.float() + tc[g]).to(torch.bfloat16)
        files.append(_save(tmp_path, f"g{g}", {"w": t0w + e[g], "c": c}))
    # group 2 is two members (e.g. a task's two split-half probes) whose merge is the group's model: τ = e3 on "w"
    # for both, and on "c" two orthogonal halves of tc[2]
    h1 = (t0c.float() + torch.tensor([0.5, 0, 0, 0, 0, 0])).to(torch.bfloat16)
    h2 = (t0c.float() + torch.tensor([0, 0, 0, 1.0, 0, 1.0])).to(torch.bfloat16)
    m1, m2 = _save(tmp_path, "h1", {"w": t0w + e[2], "c": h1}), _save(tmp_path, "h2", {"w": t0w + e[2], "c": h2})
    cores = [_core({"c": [0]}, shapes), _core({"c": [2]}, shapes), _core({"c": [3, 5]}, shapes)]
    fused, tmap = fuse_models(theta0, [files[0], files[1], [m1, m2]], cores, [1, 1, [1, 1]])
    # "w" has no core: (e1, e2, e3) with sizes 1, 1, 2 → (0.5, 0.5, √2/2, 0)
    assert torch.allclose(fused["w"], t0w + torch.tensor([0.5, 0.5, R2, 0.0]), atol=1e-6)
    assert fused["w"].dtype == torch.float32 and fused["c"].dtype == torch.bfloat16
    c = fused["c"]
    # single-model groups: their file's values, bit for bit
    assert _bits(c[0:1]).tolist() == _bits(((t0c.float() + tc[0]).to(torch.bfloat16))[0:1]).tolist()
    assert _bits(c[2:3]).tolist() == _bits(((t0c.float() + tc[1]).to(torch.bfloat16))[2:3]).tolist()
    # the merged group: its model θ0 + slerp(τ_h1, τ_h2, 1/2) in bf16 (orthogonal halves: weights √2/2)
    g2 = (t0c.float() + merge_task_vectors([h1.float() - t0c.float(), h2.float() - t0c.float()], [1, 1]))
    assert torch.equal(_bits(c[[3, 5]]), _bits(g2.to(torch.bfloat16)[[3, 5]]))
    assert torch.allclose(g2[[3, 5]], t0c.float()[[3, 5]] + R2, atol=1e-2)
    # elsewhere: the sequential SLERP of the three groups' task vectors, rounded to bf16 once
    tv = [(t0c.float() + tc[g]).to(torch.bfloat16).float() - t0c.float() for g in range(2)]
    tv.append(g2 - t0c.float())
    ref = _reference_slerp(_reference_slerp(tv[0], tv[1], 0.5), tv[2], 0.5)
    expected = (t0c.double() + ref).to(torch.bfloat16)
    assert torch.allclose(c[[1, 4]].float(), expected[[1, 4]].float(), atol=1e-2)
    assert [tmap.owned_count(g) for g in range(3)] == [1, 1, 2] and tmap.contested == 0


def test_overlap_goes_to_the_largest_importance(tmp_path):
    shapes = {"w": (6,)}
    theta0 = {"w": THETA0.clone()}
    ta = torch.tensor([1.0, 0, 3.0, 0, 0, 0])
    tb = torch.tensor([0, 2.0, 1.0, 0, 0, 0])
    fa = _save(tmp_path, "a", {"w": THETA0 + ta})
    fb = _save(tmp_path, "b", {"w": THETA0 + tb})
    cores = [_core({"w": [0, 2]}, shapes), _core({"w": [1, 2]}, shapes)]  # element 2 in both
    # by importance (aligned with each core's indices): B claims element 2 more strongly → B's value
    imp = [{"w": torch.tensor([5.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])}]
    fused, tmap = fuse_models(theta0, [fa, fb], cores, [1, 1], importance=imp)
    assert float(fused["w"][2]) == float((THETA0 + tb)[2]) and tmap.contested == 1
    assert tmap.owned(1) == _core({"w": [1, 2]}, shapes) and tmap.owned(0) == _core({"w": [0]}, shapes)
    assert tmap.summary()["resolved_by"] == "given"
    # dense importance (the tensor's size) works the same; the other way round A wins
    dense = [{"w": torch.tensor([5.0, 0, 9.0, 0, 0, 0])}, {"w": torch.tensor([0, 1.0, 2.0, 0, 0, 0])}]
    fused, tmap = fuse_models(theta0, [fa, fb], cores, [1, 1], importance=dense)
    assert float(fused["w"][2]) == float((THETA0 + ta)[2]) and tmap.owned_count(0) == 2
    # no importance: the larger update |θ_g − θ0| wins (A moved element 2 by 3, B by 1)
    fused, tmap = fuse_models(theta0, [fa, fb], cores, [1, 1])
    assert float(fused["w"][2]) == float((THETA0 + ta)[2]) and tmap.summary()["resolved_by"] == "update"
    # a tie stays with the earlier group
    tie = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 2.0])}]
    fused, tmap = fuse_models(theta0, [fa, fb], cores, [1, 1], importance=tie)
    assert float(fused["w"][2]) == float((THETA0 + ta)[2])
    with pytest.raises(DPIConfigError, match="one per core element"):
        fuse_models(theta0, [fa, fb], cores, [1, 1], importance=[{"w": torch.ones(3)}, imp[1]])


def test_group_core_importance_takes_each_elements_largest_claim():
    shapes = {"w": (5,)}
    c1, c2 = _core({"w": [0, 2]}, shapes), _core({"w": [2, 4]}, shapes)
    dense1 = {"w": torch.tensor([3.0, 0, 1.0, 0, 0])}
    dense2 = {"w": torch.tensor([0, 0, 7.0, 0, 2.0])}
    i1, i2 = core_importance(dense1, c1), core_importance(dense2, c2)
    assert i1["w"].tolist() == [3.0, 1.0] and i2["w"].tolist() == [7.0, 2.0]
    union, imp = group_core_importance([c1, c2], [i1, i2])
    assert union == _core({"w": [0, 2, 4]}, shapes) and imp["w"].tolist() == [3.0, 7.0, 2.0]


def test_transplant_map_round_trip(tmp_path):
    shapes = {"w": (6,), "v": (2, 2)}
    theta0 = {"w": THETA0.clone(), "v": torch.zeros(2, 2)}
    fa = _save(tmp_path, "a", {"w": THETA0 + 1, "v": torch.ones(2, 2)})
    fb = _save(tmp_path, "b", {"w": THETA0 + 2, "v": torch.ones(2, 2)})
    cores = [_core({"w": [0, 3], "v": []}, shapes), _core({"w": [3, 5], "v": [1]}, shapes)]
    _, tmap = fuse_models(theta0, [fa, fb], cores, [1, 1], groups=[["x"], ["y", "z"]])
    path = tmap.save(tmp_path / "dpi" / "transplant.safetensors", factor=1.0)
    back = TransplantMap.load(path)
    assert back.summary() == tmap.summary() == {"groups": [["x"], ["y", "z"]], "owned": [1, 3], "contested": 1,
                                               "resolved_by": "update"}
    for g in range(2):
        assert back.owned(g) == tmap.owned(g)
    assert back.entries["w"][1].dtype == torch.int8 and back.entries["w"][0].tolist() == [0, 3, 5]
    assert back.entries["w"][1].tolist() == [0, 1, 1]  # element 3: B moved it by 2, A by 1


def test_reads_one_tensor_of_one_file_at_a_time(tmp_path, monkeypatch):
    """The memory bound: every (file, tensor) is read once, tensor by tensor, and a file's tensor is released before
    the next one is read, so at most one tensor of one model (not a second model) is held besides θ0 and the output."""
    names = [f"layer{i}" for i in range(4)]
    shapes = {n: (3, 4) for n in names}
    torch.manual_seed(0)
    theta0 = {n: torch.randn(3, 4) for n in names}
    files = [_save(tmp_path, f"m{g}", {n: theta0[n] + torch.randn(3, 4) for n in names}) for g in range(4)]
    cores = [_core({names[g]: [g, g + 1]}, shapes) for g in range(3)]
    reads, alive, peak = [], set(), [0]
    real_open = fusion.safe_open

    class Tracked:
        def __init__(self, path, **kw):
            self.path, self.inner = path, real_open(path, **kw)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            reads.append((self.path, name))
            t = self.handle.get_tensor(name)
            key = len(reads)
            alive.add(key)
            weakref.finalize(t, alive.discard, key)
            peak[0] = max(peak[0], len(alive))
            return t

    monkeypatch.setattr(fusion, "safe_open", Tracked)
    fused, _ = fuse_models(theta0, [files[0], files[1], files[2:]], cores, [1, 2, [1, 1]])
    assert peak[0] == 1 and not alive  # never two file tensors alive at once, none kept
    # every tensor of every file read exactly once, name by name (never a whole model first)
    assert sorted(reads) == sorted((str(f), n) for f in files for n in names)
    assert [n for _, n in reads] == [n for n in names for _ in files]
    assert set(fused) == set(names)


def test_fuse_models_refuses_bad_input(tmp_path):
    shapes = {"w": (6,)}
    theta0 = {"w": THETA0.clone()}
    fa = _save(tmp_path, "a", {"w": THETA0 + 1})
    other = _save(tmp_path, "o", {"w": torch.zeros(2, 3)})
    empty = _save(tmp_path, "e", {"v": torch.zeros(1)})
    core = _core({"w": [0]}, shapes)
    with pytest.raises(DPIConfigError, match="one of each per group"):
        fuse_models(theta0, [fa, fa], [core], [1, 1])
    with pytest.raises(DPIConfigError, match="2 files but 1 sizes"):
        fuse_models(theta0, [[fa, fa]], [core], [[1]])
    with pytest.raises(DPIConfigError, match="lacks"):
        fuse_models(theta0, [fa, empty], [core, core], [1, 1])
    with pytest.raises(DPIConfigError, match="another model"):
        fuse_models(theta0, [fa, other], [core, core], [1, 1])
    with pytest.raises(DPIConfigError, match="factor=0"):
        fuse_models(theta0, [fa, fa], [core, core], [1, 1], factor=0)
    with pytest.raises(DPIConfigError, match="different models"):
        fuse_models(theta0, [fa, fa], [core, _core({"w": [0]}, {"w": (2, 3)})], [1, 1])
