"""The EWC / L2-SP engine (dpi_hf.core.anchoring): the penalty, its gradient and the decoupled pull, by hand."""

import pytest
import torch

from dpi_hf import CoreMask, DPIConfigError
from dpi_hf.core.anchoring import AnchorPenalty, normalise_importance, sum_importances


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _moved(net, seed=1):
    """Move every weight a little (θ ≠ θ_A), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _importance(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in net.named_parameters()}


def test_penalty_gradient_equals_autograd():
    net = _net()
    theta_a = {n: p.detach().clone() for n, p in net.named_parameters()}
    F = _importance(net)
    anchor = AnchorPenalty(net, 3.0, F)
    _moved(net)
    # by autograd: λ/2 Σ F (θ − θ_A)²
    net.zero_grad()
    expected = 0.5 * 3.0 * sum((F[n] * (p - theta_a[n]) ** 2).sum() for n, p in net.named_parameters())
    expected.backward()
    expected = float(expected.detach())
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)  # the task's gradient, already there
    value = anchor.add_gradient()
    assert value == pytest.approx(expected, rel=1e-6)
    assert anchor.value() == pytest.approx(expected, rel=1e-6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n] + 0.25)


def test_uniform_weights_are_l2sp_and_core_scope_keeps_only_the_core():
    net = _net()
    theta_a = {n: p.detach().clone() for n, p in net.named_parameters()}
    core = CoreMask.from_indices({"0.weight": torch.tensor([0, 5, 7])}, {n: tuple(p.shape) for n, p in
                                                                        net.named_parameters()})
    l2sp, on_core = AnchorPenalty(net, 2.0), AnchorPenalty(net, 2.0, only=core)
    assert l2sp.elements == sum(p.numel() for p in net.parameters()) and on_core.elements == 3
    assert on_core.nbytes == 3 * (4 + 8)  # θ_A and the indices at the core only (F = 1: no copy)
    _moved(net)
    d = {n: p.detach() - theta_a[n] for n, p in net.named_parameters()}
    assert l2sp.value() == pytest.approx(float(sum((x ** 2).sum() for x in d.values())), rel=1e-6)
    assert on_core.value() == pytest.approx(float((d["0.weight"].flatten()[[0, 5, 7]] ** 2).sum()), rel=1e-6)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    on_core.add_gradient()
    grad = net[0].weight.grad.flatten()
    torch.testing.assert_close(grad[[0, 5, 7]], 2.0 * d["0.weight"].flatten()[[0, 5, 7]])
    assert int((grad != 0).sum()) == 3 and all(not p.grad.any() for p in list(net.parameters())[1:])


def test_excluded_elements_are_out_of_the_penalty():
    net = _net()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    frozen = CoreMask.from_indices({"2.bias": torch.tensor([1])}, shapes)
    anchor = AnchorPenalty(net, 1.0, _importance(net), exclude=frozen)
    _moved(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    anchor.add_gradient()
    assert net[2].bias.grad[1] == 0 and net[2].bias.grad[0] != 0


@pytest.mark.parametrize("only", [False, True])
def test_decoupled_pull(only):
    net = _net()
    theta_a = {n: p.detach().clone() for n, p in net.named_parameters()}
    F = _importance(net)
    F["0.weight"].view(-1)[3] = 1e6  # lr·λ·F > 1: the pull stops at θ_A, never past it
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    core = CoreMask.from_indices({"0.weight": torch.tensor([3, 4])}, shapes) if only else None
    anchor = AnchorPenalty(net, 5.0, F, only=core)
    _moved(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    anchor.pull(0.01)
    for n, p in net.named_parameters():
        factor = torch.clamp(0.01 * 5.0 * F[n], max=1.0)
        want = before[n] - factor * (before[n] - theta_a[n])
        if only:
            keep = torch.ones(p.numel(), dtype=torch.bool)
            if n == "0.weight":
                keep[[3, 4]] = False
            want = torch.where(keep.view(p.shape), before[n], want)
        torch.testing.assert_close(p.detach(), want)
    assert net[0].weight.view(-1)[3] == theta_a["0.weight"].view(-1)[3]


def test_zero_strength_changes_nothing():
    net = _net()
    anchor = AnchorPenalty(net, 0.0, _importance(net))
    _moved(net)
    grads = {n: torch.randn(p.shape) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = grads[n].clone()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert anchor.add_gradient() == 0.0
    anchor.pull(0.1)
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), before[n])


def test_normalise_and_sum():
    a = {"x": torch.tensor([1.0, 3.0]), "y": torch.tensor([[0.0, 4.0]])}
    na = normalise_importance(a)
    assert float(sum(t.sum() for t in na.values())) / 4 == pytest.approx(1.0)
    summed = sum_importances([na, {"x": torch.ones(2)}])
    torch.testing.assert_close(summed["x"], na["x"] + 1)
    torch.testing.assert_close(summed["y"], na["y"])
    with pytest.raises(DPIConfigError, match="zero everywhere"):
        normalise_importance({"x": torch.zeros(3)})


def test_bad_anchor_input():
    net = _net()
    with pytest.raises(DPIConfigError, match=">= 0"):
        AnchorPenalty(net, -1.0)
    with pytest.raises(DPIConfigError, match="does not have"):
        AnchorPenalty(net, 1.0, {"nope": torch.ones(2)})
    with pytest.raises(DPIConfigError, match="shape"):
        AnchorPenalty(net, 1.0, {"0.weight": torch.ones(2)})


def test_replaced_parameters_are_refused():
    net = _net()
    anchor = AnchorPenalty(net, 1.0)
    anchor.check_parameters(net)
    net[0].weight = torch.nn.Parameter(net[0].weight.detach().clone())  # what sharding or a reload does
    with pytest.raises(DPIConfigError, match="replaced"):
        anchor.check_parameters(net)


def test_bf16_parameters():
    net = _net().to(torch.bfloat16)
    anchor = AnchorPenalty(net, 2.0)
    _moved(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    assert anchor.value() > 0
    anchor.add_gradient()
    anchor.pull(0.1)
    for p in net.parameters():
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 and p.grad.any()
