"""Exact streaming core selection (dpi_hf/core/selection.py) against a brute-force reference."""

import json
import math
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dpi_hf.core import selection
from dpi_hf.core.errors import DPIConfigError, ProbeDivergedError
from dpi_hf.core.masks import CoreMask
from dpi_hf.core.selection import filter_parameter_names, select_core
from dpi_hf.core.signals import UpdateMagnitudes, update_magnitudes

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (chunk size, largest threshold bin kept in memory): the default path, chunk edges everywhere, and the
# three-pass path that handles a threshold bin too large to keep (forced with a limit of 0).
MODES = [(selection._CHUNK, selection._MAX_BOUNDARY), (3, selection._MAX_BOUNDARY), (4, 0)]


# ------------------------------------------------------------------------------------------------ reference
def floor_p(p, n):
    return math.floor(Fraction(str(p)) * n)


def brute_force(pairs, p, scope):
    """name → sorted selected flat indices: a stable sort over the concatenation with the (tensor, index) tie rule."""
    if scope == "per_tensor":
        out = {}
        for name, t in pairs:
            vals = t.float().reshape(-1).double().numpy()
            k = floor_p(p, vals.size)
            order = np.lexsort((np.arange(vals.size), -vals))[:k]
            out[name] = np.sort(order)
        return out
    vals = np.concatenate([t.float().reshape(-1).double().numpy() for _, t in pairs])
    tensor_id = np.concatenate([np.full(t.numel(), i) for i, (_, t) in enumerate(pairs)])
    flat = np.concatenate([np.arange(t.numel()) for _, t in pairs])
    chosen = np.lexsort((flat, tensor_id, -vals))[: floor_p(p, vals.size)]
    return {name: np.sort(flat[chosen[tensor_id[chosen] == i]]) for i, (name, _) in enumerate(pairs)}


def assert_matches(mask, pairs, p, scope):
    expected = brute_force(pairs, p, scope)
    assert mask.names() == [n for n, _ in pairs]
    for name, t in pairs:
        assert mask.shape(name) == tuple(t.shape)
        np.testing.assert_array_equal(mask.indices(name).numpy(), expected[name], err_msg=name)
    # the defining property, checked directly as well: every selected value >= every unselected value
    vals = [(t.float().reshape(-1), mask.dense(n).reshape(-1)) for n, t in pairs]
    sel = torch.cat([v[m] for v, m in vals])
    rest = torch.cat([v[~m] for v, m in vals])
    if scope == "global" and sel.numel() and rest.numel():
        assert sel.min() >= rest.max()


# ------------------------------------------------------------------------------------------------ strategies
SHAPES = st.one_of(
    st.tuples(st.integers(0, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 8)),
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)),
    st.sampled_from([(), (1,), (1, 1)]),
)
FRACTIONS = st.one_of(st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]), st.floats(0.001, 1.0))


def make_values(kind, shape, rng):
    n = math.prod(shape)
    if kind == "small_int":  # lots of ties
        v = rng.integers(0, 4, n).astype(np.float32)
    elif kind == "zeros":  # mostly exact zeros, some of them -0.0
        v = np.where(rng.random(n) < 0.7, 0.0, rng.integers(1, 3, n)).astype(np.float32)
        v[(v == 0) & (rng.random(n) < 0.3)] = -0.0
    elif kind == "low_bits":  # values sharing their high 16 bits, so the low-16-bit pass decides
        v = (np.float32(1.0) + rng.integers(0, 5, n).astype(np.float32) * np.float32(2**-20)) * rng.choice(
            np.array([1.0, 2.0], dtype=np.float32), n
        )
    else:
        v = np.abs(rng.standard_normal(n)).astype(np.float32)
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


@st.composite
def delta_sets(draw, min_tensors=1, max_tensors=6):
    shapes = draw(st.lists(SHAPES, min_size=min_tensors, max_size=max_tensors))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(["small_int", "zeros", "low_bits", "normal"]), min_size=1, max_size=1))
    return [(f"layer{i}.weight", make_values(kinds[0], s, rng).to(dtype)) for i, s in enumerate(shapes)]


def as_form(pairs, form):
    if form == "dict":
        return dict(pairs)
    if form == "list":
        return list(pairs)
    if form == "callable":
        return lambda: iter(pairs)
    return (pair for pair in pairs)  # a one-shot generator


# ------------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"chunk{m[0]}-keep{m[1]}")
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@settings(max_examples=60, deadline=None)
@given(pairs=delta_sets(), p=FRACTIONS, form=st.sampled_from(["dict", "list", "callable", "generator"]))
def test_matches_brute_force(mode, scope, pairs, p, form):
    sizes = [t.numel() for _, t in pairs]
    expected_total = floor_p(p, sum(sizes)) if scope == "global" else sum(floor_p(p, n) for n in sizes)
    with mock.patch.object(selection, "_CHUNK", mode[0]), mock.patch.object(selection, "_MAX_BOUNDARY", mode[1]):
        if expected_total == 0:
            with pytest.raises(DPIConfigError, match="core_fraction"):
                select_core(as_form(pairs, form), p, scope=scope)
            return
        mask = select_core(as_form(pairs, form), p, scope=scope)
    assert mask.count() == expected_total
    assert_matches(mask, pairs, p, scope)


@pytest.mark.parametrize("mode", [MODES[0], MODES[2]], ids=["kept", "three-pass"])
@settings(max_examples=20, deadline=None)
@given(pairs=delta_sets(min_tensors=25, max_tensors=40), p=st.sampled_from([0.05, 0.3, 1.0]))
def test_many_tensors(mode, pairs, p):
    total = sum(t.numel() for _, t in pairs)
    with mock.patch.object(selection, "_CHUNK", mode[0]), mock.patch.object(selection, "_MAX_BOUNDARY", mode[1]):
        if floor_p(p, total) == 0:
            with pytest.raises(DPIConfigError):
                select_core(pairs, p)
            return
        mask = select_core(pairs, p)
    assert_matches(mask, pairs, p, "global")


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_chunk_tensors_default_chunk(dtype):
    # tensors larger than one default chunk, so that chunk offsets matter
    g = torch.Generator().manual_seed(0)
    pairs = [("a", torch.randn(700, 500, generator=g).abs().to(dtype)), ("b", torch.randn(300_001, generator=g).abs())]
    for p in (0.01, 0.2):
        assert_matches(select_core(pairs, p), pairs, p, "global")
    assert_matches(select_core(pairs, 0.01, scope="per_tensor"), pairs, 0.01, "per_tensor")


def test_every_value_equal_takes_earliest():
    pairs = [("a", torch.ones(3, 4)), ("b", torch.ones(10))]
    mask = select_core(dict(pairs), 0.5)
    assert mask.indices("a").tolist() == list(range(11)) and mask.count("b") == 0
    mask = select_core(dict(pairs), 0.5, scope="per_tensor")
    assert mask.indices("a").tolist() == list(range(6)) and mask.indices("b").tolist() == list(range(5))


def test_fraction_one_selects_everything_and_exact_floor():
    pairs = {"a": torch.rand(10, 10), "b": torch.zeros(7)}
    assert select_core(pairs, 1.0).count() == 107
    assert select_core(pairs, 1).count() == 107
    # 0.29 of 100 is 29 (the binary float 0.28999... would give 28)
    assert select_core({"a": torch.rand(100)}, 0.29).count() == 29
    assert select_core({"a": torch.rand(100)}, Fraction(3, 10)).count() == 30


def test_negative_zero_ranks_as_zero():
    t = torch.tensor([-0.0, 0.0, 1.0, -0.0, 0.0, 2.0, -0.0, 0.0])
    for dtype in DTYPES:
        assert select_core({"a": t.to(dtype)}, 0.5).indices("a").tolist() == [0, 1, 2, 5]


def test_include_exclude():
    g = torch.Generator().manual_seed(1)
    names = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.norm.weight", "lm_head.weight"]
    pairs = [(n, torch.randint(0, 3, (5, 4), generator=g).float()) for n in names]
    mask = select_core(dict(pairs), 0.25, exclude=["embed_tokens", "*norm*"])
    kept = [pairs[1], pairs[3]]
    assert_matches(mask, kept, 0.25, "global")
    mask = select_core(pairs, 0.5, include="model.layers.*", exclude="norm")
    assert_matches(mask, [pairs[1]], 0.5, "global")


def test_filter_parameter_names():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.0.mlp.bias", "lm_head.weight"]
    assert filter_parameter_names(names) == names
    assert filter_parameter_names(names, include=["embed_tokens"]) == names[:1]  # substring
    assert filter_parameter_names(names, include=["*.bias"]) == names[2:3]  # glob over the whole name
    assert filter_parameter_names(names, include=["mlp"], exclude=["*.bias"]) == names[1:2]
    assert filter_parameter_names(names, include="model.*", exclude="embed") == names[1:3]
    assert filter_parameter_names(names, include=["MLP"]) == []  # case-sensitive
    assert filter_parameter_names(reversed(names), exclude=["mlp"]) == [names[3], names[0]]  # input order kept
    with pytest.raises(DPIConfigError, match="include"):
        filter_parameter_names(names, include=[3])
    with pytest.raises(DPIConfigError, match="exclude"):
        filter_parameter_names(names, exclude=5)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.1", None, True, torch.tensor(0.1)])
def test_bad_fraction(p):
    with pytest.raises(DPIConfigError, match="core_fraction"):
        select_core({"a": torch.rand(10)}, p)


def test_bad_scope_and_patterns():
    with pytest.raises(DPIConfigError, match="scope"):
        select_core({"a": torch.rand(10)}, 0.5, scope="tensor")
    with pytest.raises(DPIConfigError, match="include"):
        select_core({"a": torch.rand(10)}, 0.5, include=5)


@pytest.mark.parametrize("deltas", [{}, [], (p for p in []), lambda: iter([])])
def test_empty(deltas):
    with pytest.raises(DPIConfigError, match="empty"):
        select_core(deltas, 0.1)


@pytest.mark.parametrize("form", ["dict", "list", "generator"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_everything_excluded(form, scope):
    pairs = [("a.weight", torch.rand(10)), ("b.weight", torch.rand(10))]
    with pytest.raises(DPIConfigError, match=r"include=\['c'\].*exclude=\['b'\]"):
        select_core(as_form(pairs, form), 0.5, scope=scope, include=["c"], exclude=["b"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_diverged_probe(bad, dtype, scope):
    t = torch.rand(4, 5)
    t[2, 3] = bad
    with pytest.raises(ProbeDivergedError, match=r"'layers\.1\.w'.*diverged.*learning rate"):
        select_core({"layers.0.w": torch.rand(30), "layers.1.w": t.to(dtype)}, 0.5, scope=scope)


def test_diverged_in_a_tensor_with_nothing_selected():
    # per-tensor ⌊p·n⌋ = 0 for the small tensor: it is still validated
    with pytest.raises(ProbeDivergedError, match="'small'"):
        select_core({"big": torch.rand(100), "small": torch.tensor([float("nan")])}, 0.1, scope="per_tensor")


def test_negative_values():
    with pytest.raises(DPIConfigError, match=r"'a'.*negative.*abs\(\)"):
        select_core({"a": torch.tensor([0.5, -1e-30, 2.0])}, 0.5)


def test_fraction_too_small():
    with pytest.raises(DPIConfigError, match=r"core_fraction=0\.01.*50 elements"):
        select_core({"a": torch.rand(50)}, 0.01)
    with pytest.raises(DPIConfigError, match="core_fraction"):
        select_core([("a", torch.rand(60)), ("b", torch.rand(60))], 0.01, scope="per_tensor")
    # global scope pools the elements: 120 elements give one
    assert select_core([("a", torch.rand(60)), ("b", torch.rand(60))], 0.01).count() == 1


def test_bad_values_and_items():
    with pytest.raises(DPIConfigError, match="'a'.*floating"):
        select_core({"a": torch.arange(10)}, 0.5)
    with pytest.raises(DPIConfigError, match="pairs"):
        select_core([torch.rand(3)], 0.5)
    with pytest.raises(DPIConfigError, match="mapping"):
        select_core(torch.rand(3), 0.5)
    with pytest.raises(DPIConfigError, match="update_magnitudes"):
        select_core(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(DPIConfigError, match="twice"):
        select_core([("a", torch.rand(3)), ("a", torch.rand(3))], 0.5)


def test_source_changing_between_passes():
    calls = []

    def changing():
        calls.append(1)
        return iter([("a", torch.rand(10)), ("b", torch.rand(10 if len(calls) == 1 else 11))])

    with pytest.raises(DPIConfigError, match="later pass"):
        select_core(changing, 0.5)


# ------------------------------------------------------------------------------------------------ update_magnitudes
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.proj = torch.nn.Linear(4, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3, bias=False)
        self.head.weight.requires_grad_(False)


@pytest.fixture
def tuned():
    torch.manual_seed(0)
    model = Tiny()
    reference = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randint(-2, 3, p.shape).float() * 0.25)  # integer steps: many tied magnitudes
    expected = {
        n: (p.detach() - reference[n]).abs() for n, p in model.named_parameters() if p.requires_grad
    }
    return model, reference, expected


def check_magnitudes(um, expected):
    assert isinstance(um, UpdateMagnitudes)
    for _ in range(2):  # re-iterable
        got = list(um.items())
        assert [n for n, _ in got] == list(expected)
        for n, t in got:
            assert t.dtype == torch.float32 and t.device.type == "cpu"
            torch.testing.assert_close(t, expected[n], rtol=0, atol=0)


def test_update_magnitudes_state_dict(tuned):
    model, reference, expected = tuned
    um = update_magnitudes(model, reference)
    check_magnitudes(um, expected)
    assert "head.weight" not in um  # not trainable
    # a mapping of parameters: all of them, including the frozen one
    um = update_magnitudes(dict(model.named_parameters()), reference, exclude="head")
    check_magnitudes(um, expected)
    um = update_magnitudes(model, reference, include=["proj", "norm"], exclude="*.bias")
    check_magnitudes(um, {n: expected[n] for n in ["proj.weight", "norm.weight"]})


def test_update_magnitudes_safetensors_file(tuned, tmp_path):
    model, reference, expected = tuned
    save_file(reference, tmp_path / "ref.safetensors")
    check_magnitudes(update_magnitudes(model, tmp_path / "ref.safetensors"), expected)
    check_magnitudes(update_magnitudes(model, str(tmp_path / "ref.safetensors")), expected)


def test_update_magnitudes_checkpoint_dirs(tuned, tmp_path):
    model, reference, expected = tuned
    names = list(reference)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for fname, part in shards.items():
        save_file({n: reference[n] for n in part}, sharded / fname)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}})
    )
    check_magnitudes(update_magnitudes(model, sharded), expected)
    # the same shards without an index
    (sharded / "model.safetensors.index.json").unlink()
    check_magnitudes(update_magnitudes(model, sharded), expected)
    single = tmp_path / "single"
    single.mkdir()
    save_file(reference, single / "model.safetensors")
    check_magnitudes(update_magnitudes(model, single), expected)


def test_update_magnitudes_low_precision(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    reference = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model.weight.mul_(1.5)
    um = update_magnitudes(model, reference)
    torch.testing.assert_close(um["weight"], (model.weight.float() - reference["weight"].float()).abs(), rtol=0, atol=0)
    assert um["bias"].abs().sum() == 0


def test_update_magnitudes_is_lazy(tuned):
    model, reference, _ = tuned
    um = update_magnitudes(model, reference)
    with torch.no_grad():
        model.proj.weight.add_(100.0)
    assert um["proj.weight"].min() >= 99.0  # computed when read, from the current values


def test_select_core_on_update_magnitudes(tuned, tmp_path):
    model, reference, expected = tuned
    save_file(reference, tmp_path / "ref.safetensors")
    for ref in (reference, tmp_path / "ref.safetensors"):
        for scope in ("global", "per_tensor"):
            mask = select_core(update_magnitudes(model, ref), 0.2, scope=scope)
            assert isinstance(mask, CoreMask)
            assert_matches(mask, list(expected.items()), 0.2, scope)
    mask = select_core(update_magnitudes(model, reference), 0.2, exclude="embed")
    assert_matches(mask, [(n, t) for n, t in expected.items() if "embed" not in n], 0.2, "global")


def test_update_magnitudes_errors(tuned, tmp_path):
    model, reference, _ = tuned
    missing = {n: t for n, t in reference.items() if n != "proj.bias"}
    with pytest.raises(DPIConfigError, match="'proj.bias'.*missing"):
        update_magnitudes(model, missing)
    wrong = dict(reference, **{"norm.weight": torch.zeros(7)})
    with pytest.raises(DPIConfigError, match=r"'norm.weight'.*\(6,\).*\(7,\)"):
        update_magnitudes(model, wrong)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(DPIConfigError, match="'norm.weight'"):
        update_magnitudes(model, tmp_path / "wrong.safetensors")
    with pytest.raises(DPIConfigError, match="does not exist"):
        update_magnitudes(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DPIConfigError, match="safetensors"):
        update_magnitudes(model, tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DPIConfigError, match="cannot read"):
        update_magnitudes(model, tmp_path / "junk.safetensors")
    with pytest.raises(DPIConfigError, match="include"):
        update_magnitudes(model, reference, include=["nothing"])
    with pytest.raises(DPIConfigError, match="model_or_named_params"):
        update_magnitudes([torch.zeros(2)], reference)
    with pytest.raises(DPIConfigError, match="reference"):
        update_magnitudes(model, 42)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(DPIConfigError, match="trainable"):
        update_magnitudes(frozen, {})
