"""Exact freezing: frozen elements keep their bits through every optimizer/training setup measured."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from dpi_hf.core import CoreMask, DPIConfigError, ParameterFreezer
from dpi_hf.core.freezing import _dtensor_shard, local_shard_indices

torch.set_num_threads(1)

STEPS = 10


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny MLP whose weights have 4096 elements, bitsandbytes' default min_8bit_size."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 32)).to(dtype)


def make_mask(model: nn.Module, fraction: float = 0.25, seed: int = 1) -> CoreMask:
    """A random selection in the weights and the first bias, the whole second bias, nothing elsewhere omitted."""
    g = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, p in model.named_parameters():
        shapes[name] = p.shape
        if name == "2.bias":
            indices[name] = torch.arange(p.numel())  # exercises the "whole tensor frozen" path
        else:
            indices[name] = torch.randperm(p.numel(), generator=g)[: int(fraction * p.numel())]
    return CoreMask.from_indices(indices, shapes)


def batch(seed: int = 2, n: int = 16, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g).to(dtype), torch.randn(n, 32, generator=g).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor, so that comparisons are exact (-0.0 vs 0.0, NaN payloads)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.detach().contiguous().view(view).clone()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: bits(p) for n, p in model.named_parameters()}


def frozen_changed(before: dict[str, torch.Tensor], model: nn.Module, mask: CoreMask) -> tuple[int, int]:
    """(number of frozen elements whose bits changed, number of trainable elements whose bits changed)."""
    frozen_diff = trainable_diff = 0
    for name, p in model.named_parameters():
        diff = (before[name] != bits(p)).reshape(-1)
        sel = mask.dense(name).reshape(-1) if name in mask else torch.zeros_like(diff)
        frozen_diff += int(diff[sel].sum())
        trainable_diff += int(diff[~sel].sum())
    return frozen_diff, trainable_diff


def trainable_count(model: nn.Module, mask: CoreMask) -> int:
    return sum(p.numel() for p in model.parameters()) - mask.count()


def train(model, opt, steps=STEPS, accumulation=1, clip=None, autocast=False, seed=2):
    """Plain training loop: accumulate, clip, step, zero_grad — as the HF Trainer orders it."""
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    for _ in range(steps):
        for micro in range(accumulation):
            xs, ys = x[micro::accumulation], y[micro::accumulation]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(xs).float(), ys.float())
            (loss / accumulation).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_exact_freeze(before, model, mask):
    frozen_diff, trainable_diff = frozen_changed(before, model, mask)
    assert frozen_diff == 0, f"{frozen_diff} frozen elements changed"
    # the trainable elements must really train (not a vacuous freeze of everything)
    assert trainable_diff > 0.9 * trainable_count(model, mask), (trainable_diff, trainable_count(model, mask))


# ------------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_adamw_weight_decay_is_exact(impl):
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **impl)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt)
    assert_exact_freeze(before, model, mask)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
    ids=["adamw", "sgd"],
)
def test_attached_after_momentum_built_up(make_opt):
    model = make_model()
    mask = make_mask(model)
    opt = make_opt(model.parameters())
    train(model, opt, steps=5)  # moments / momentum buffers now non-zero at the frozen positions
    assert all(any(torch.is_tensor(v) and v.abs().sum() > 0 for v in s.values()) for s in opt.state.values())
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt)
    assert_exact_freeze(before, model, mask)


def test_sgd_momentum_nesterov_weight_decay():
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt)
    assert_exact_freeze(before, model, mask)


def test_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    model = make_model()
    mask = make_mask(model)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt)
    assert_exact_freeze(before, model, mask)
    # the 4096-element weights really use 8-bit state (numel >= min_8bit_size), the biases 32-bit
    state_dtypes = {n: opt.state[p]["state1"].dtype for n, p in model.named_parameters()}
    assert state_dtypes["0.weight"] == torch.uint8 and state_dtypes["2.weight"] == torch.uint8
    assert state_dtypes["0.bias"] == torch.float32


def test_accumulation_and_clipping():
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt, accumulation=4, clip=1e-3)  # tiny max norm: clipping is active on every step
    assert_exact_freeze(before, model, mask)


def test_bf16_autocast():
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt, autocast=True)
    assert_exact_freeze(before, model, mask)


def test_bf16_parameters():
    model = make_model(dtype=torch.bfloat16)
    mask = make_mask(model)
    # lr * weight_decay must exceed bf16's relative precision (2**-8), or decay alone would round to no change
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = snapshot(model)
    freezer = ParameterFreezer(model, mask).attach(opt)
    # bf16 parameters keep bf16 values: 16 bits per saved value
    fully = model[2].bias.numel()
    assert freezer.nbytes == (mask.count() - fully) * (4 + 2) + fully * 2
    train(model, opt)
    freezer.detach()
    assert_exact_freeze(before, model, mask)


def test_accelerate_wrapped_optimizer():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    accelerator = accelerate.Accelerator(cpu=True)
    try:
        model = make_model()
        mask = make_mask(model)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        wrapped = accelerator.prepare_optimizer(inner)
        assert isinstance(wrapped, AcceleratedOptimizer) and wrapped.optimizer is inner
        before = snapshot(model)
        with ParameterFreezer(model, mask).attach(wrapped):
            assert len(inner._optimizer_step_post_hooks) == 1  # on the inner optimizer, where step() fires hooks
            train(model, wrapped)
        assert_exact_freeze(before, model, mask)
    finally:
        AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------------------------------ why the engine exists
def test_naive_gradient_mask_is_not_a_freeze():
    model = make_model()
    mask = make_mask(model)
    for name, p in model.named_parameters():
        keep = (~mask.dense(name)).to(p.dtype)
        p.register_hook(lambda g, keep=keep: g * keep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    train(model, opt)
    frozen_diff, _ = frozen_changed(before, model, mask)
    # decoupled weight decay shrinks every element of the group, masked gradient or not
    assert frozen_diff > 0.9 * mask.count()


# ------------------------------------------------------------------------------------------------ mechanics
def test_detach_removes_hooks_and_frees_copies():
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = ParameterFreezer(model, mask).attach(opt)
    assert freezer.attached and freezer.nbytes > 0
    freezer.detach()
    freezer.detach()  # idempotent
    assert not freezer.attached and freezer.nbytes == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    before = snapshot(model)
    train(model, opt, steps=3)
    frozen_diff, _ = frozen_changed(before, model, mask)
    assert frozen_diff > 0.9 * mask.count()
    with pytest.raises(DPIConfigError, match="detached"):
        freezer.restore()


def test_reattach_freezes_current_values():
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = ParameterFreezer(model, mask).attach(opt)
    train(model, opt, steps=2)
    freezer.detach()
    train(model, opt, steps=2)  # frozen elements move while detached
    before = snapshot(model)
    freezer.attach(opt)
    train(model, opt)
    freezer.detach()
    assert_exact_freeze(before, model, mask)


def test_manual_restore_without_optimizer():
    """The Trainer-callback path: gradient hooks from attach(), restore() from on_optimizer_step."""
    model = make_model()
    mask = make_mask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.register_step_post_hook(lambda *_: freezer.restore())
    before = snapshot(model)
    with ParameterFreezer(model, mask) as freezer:
        assert freezer.attached and len(opt._optimizer_step_post_hooks) == 1
        train(model, opt)
    assert not freezer.attached
    assert_exact_freeze(before, model, mask)


def test_clip_norm_is_the_masked_gradient_norm():
    x, y = batch()
    reference = make_model()
    mask = make_mask(reference)
    nn.functional.mse_loss(reference(x), y).backward()
    masked = [p.grad.masked_fill(mask.dense(n), 0.0) for n, p in reference.named_parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in masked]))

    model = make_model()
    freezer = ParameterFreezer(model, mask).attach()
    nn.functional.mse_loss(model(x), y).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    for (name, p), g in zip(model.named_parameters(), masked):
        assert torch.equal(p.grad[mask.dense(name)], torch.zeros(int(mask.count(name))))
        torch.testing.assert_close(p.grad, g * (1e-3 / (expected + 1e-6)))
    freezer.detach()


def test_zero_frozen_grads():
    model = make_model()
    mask = make_mask(model)
    x, y = batch()
    nn.functional.mse_loss(model(x), y).backward()  # gradients computed before the freezer exists
    freezer = ParameterFreezer(model, mask)
    freezer.zero_frozen_grads()
    for name, p in model.named_parameters():
        sel = mask.dense(name)
        assert torch.count_nonzero(p.grad[sel]) == 0 and torch.count_nonzero(p.grad[~sel]) == (~sel).sum()


def test_memory_is_compact_int32_indices():
    model = make_model()
    mask = make_mask(model)
    freezer = ParameterFreezer(model, mask)
    fully = model[2].bias.numel()
    assert freezer.frozen_count == mask.count()
    assert freezer.nbytes == (mask.count() - fully) * (4 + 4) + fully * 4
    total = sum(p.numel() for p in model.parameters())
    assert freezer.bits_per_parameter == pytest.approx(freezer.nbytes * 8 / total)
    record = next(r for r in freezer._records if r.indices is not None)
    assert record.indices.dtype == torch.int32 and record.values.dtype == torch.float32


def test_non_contiguous_parameter():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.weight = nn.Parameter(torch.randn(64, 32).t())  # (32, 64), strides (1, 32)

        def forward(self, x):
            return torch.tanh(x @ self.weight)[:, :32]

    model = Transposed()
    assert not model.weight.is_contiguous()
    g = torch.Generator().manual_seed(3)
    mask = CoreMask.from_indices({"weight": torch.randperm(2048, generator=g)[:500]}, {"weight": (32, 64)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with ParameterFreezer(model, mask).attach(opt):
        train(model, opt)
    assert_exact_freeze(before, model, mask)


def test_tied_parameter_alias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Tied()
    assert "b.weight" not in dict(model.named_parameters())
    shapes = {"a.weight": (32, 32), "b.weight": (32, 32)}
    mask = CoreMask.from_indices({"a.weight": torch.arange(0, 100), "b.weight": torch.arange(50, 300)}, shapes)
    freezer = ParameterFreezer(model, mask)
    assert freezer.frozen_count == 300  # the alias selections merge on the one tensor
    assert [n for n, _ in freezer.frozen_parameters()] == ["a.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = bits(model.a.weight).reshape(-1)
    with freezer.attach(opt):
        train(model, opt)
    after = bits(model.a.weight).reshape(-1)
    assert torch.equal(before[:300], after[:300]) and bool((before[300:] != after[300:]).all())


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    model = make_model()
    mask = make_mask(model)
    with pytest.raises(DPIConfigError, match="model must be"):
        ParameterFreezer("model", mask)
    with pytest.raises(DPIConfigError, match="frozen must be a CoreMask"):
        ParameterFreezer(model, {"0.weight": torch.zeros(128, 32, dtype=torch.bool)})
    wrong_shape = CoreMask.from_indices({"2.weight": torch.tensor([0])}, {"0.bias": (128,), "2.weight": (128, 32)})
    with pytest.raises(DPIConfigError, match="'2.weight'.*shape"):
        ParameterFreezer(model, wrong_shape)
    unknown = CoreMask.from_indices({"9.weight": torch.tensor([0])}, {"0.bias": (128,), "9.weight": (4, 4)})
    with pytest.raises(DPIConfigError, match="'9.weight'.*strict=False"):
        ParameterFreezer(model, unknown)
    assert ParameterFreezer(model, unknown, strict=False).frozen_count == 0
    freezer = ParameterFreezer(model, mask).attach()
    with pytest.raises(DPIConfigError, match="already attached"):
        freezer.attach()
    freezer.detach()
    with pytest.raises(DPIConfigError, match="register_step_post_hook"):
        freezer.attach(types.SimpleNamespace(optimizer=object()))
    assert not freezer.attached


# ------------------------------------------------------------------------------------------------ sharding (FSDP2)
@pytest.mark.parametrize("shape", [(10, 3), (7,), (5, 2, 3), (1, 4), (3, 1)])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
def test_local_shard_indices_match_torch_chunk(shape, num_shards):
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    g = torch.Generator().manual_seed(num_shards)
    flat = torch.randperm(full.numel(), generator=g)[: max(1, full.numel() // 2)].sort().values
    chunks = list(torch.chunk(full, num_shards, dim=0))
    chunks += [full[:0]] * (num_shards - len(chunks))  # torch.chunk drops trailing empty shards; FSDP2 keeps them
    covered = []
    for rank, chunk in enumerate(chunks):
        local, start, stop = local_shard_indices(flat, shape, num_shards, rank)
        assert local.dtype == torch.int64
        # the element at each local position is the full-tensor element the index named
        assert torch.equal(chunk.reshape(-1)[local], flat[start:stop])
        covered.append(flat[start:stop])
    assert torch.equal(torch.cat(covered), flat)  # every index lands on exactly one shard


def test_local_shard_indices_bad_input():
    with pytest.raises(DPIConfigError, match="shard_index"):
        local_shard_indices(torch.tensor([0]), (4, 4), 2, 2)
    with pytest.raises(DPIConfigError, match="0-dim"):
        local_shard_indices(torch.tensor([0]), (), 1, 0)


def test_dtensor_placements():
    from torch.distributed.tensor import Replicate, Shard

    # stand-ins exposing what _dtensor_shard reads from a DTensor: placements and device_mesh
    mesh = types.SimpleNamespace(get_coordinate=lambda: [1, 2], size=lambda d: [2, 4][d])
    fsdp_mesh = types.SimpleNamespace(get_coordinate=lambda: [3], size=lambda d: 4)
    fsdp = types.SimpleNamespace(placements=(Shard(0),), device_mesh=fsdp_mesh)
    assert _dtensor_shard("w", fsdp) == (4, 3)
    hsdp = types.SimpleNamespace(placements=(Replicate(), Shard(0)), device_mesh=mesh)
    assert _dtensor_shard("w", hsdp) == (4, 2)
    replicated = types.SimpleNamespace(placements=(Replicate(), Replicate()), device_mesh=mesh)
    assert _dtensor_shard("w", replicated) == (1, 0)
    not_in_mesh = types.SimpleNamespace(get_coordinate=lambda: None)
    outside = types.SimpleNamespace(placements=(Shard(0),), device_mesh=not_in_mesh)
    assert _dtensor_shard("w", outside) is None
    for placements in [(Shard(1),), (Shard(0), Shard(0))]:
        tp = types.SimpleNamespace(placements=placements, device_mesh=mesh)
        with pytest.raises(NotImplementedError, match="'w'.*Shard\\(0\\)"):
            _dtensor_shard("w", tp)
