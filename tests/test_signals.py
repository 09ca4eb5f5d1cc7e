"""The signal registry: a name says how a signal is computed, what it needs and how its cores are judged, and adding a
signal is one registration that every module then honours."""

from types import SimpleNamespace

import pytest
import torch

import dpi_hf
from dpi_hf import DPIConfigError
from dpi_hf.core import reliability, signals
from dpi_hf.core.signals import SIGNAL_REGISTRY, ImportanceAccumulator, Signal, get_signal, register_signal

torch.set_num_threads(1)


def _add_abs(buffer, grad):
    buffer.add_(grad.abs())


@pytest.fixture
def gradabs(monkeypatch):
    """A new gradient signal Σ|g|, registered for one test only."""
    monkeypatch.setattr(signals, "SIGNAL_REGISTRY", dict(SIGNAL_REGISTRY))
    # the modules that read the registry hold the same dict object: point them at the test's copy
    monkeypatch.setattr(reliability, "SIGNAL_REGISTRY", signals.SIGNAL_REGISTRY)
    return register_signal(Signal("gradabs", "Σ|g|", "the summed gradient magnitude", accumulate=_add_abs,
                                  finish=lambda b: b))


def test_builtin_signals_say_how_they_are_computed():
    assert list(SIGNAL_REGISTRY) == ["fisher", "gradsum", "update"] and signals.DEFAULT_SIGNAL == "fisher"
    assert signals.SIGNALS == ("fisher", "gradsum", "update") and signals.GRADIENT_SIGNALS == ("fisher", "gradsum")
    fisher, update = get_signal("fisher"), get_signal("update")
    assert fisher.reads_gradients and not fisher.needs_steps and not fisher.needs_reference
    assert not update.reads_gradients and update.needs_steps and update.needs_reference
    # the update signal lives with the others, and dpi_hf.core.update_magnitudes is still importable
    assert update.from_weights is signals.update_magnitudes is dpi_hf.core.update_magnitudes is dpi_hf.update_magnitudes
    g = torch.tensor([1.0, -2.0, 3.0])
    buf = torch.zeros(3)
    fisher.accumulate(buf, g)
    fisher.accumulate(buf, g)
    assert torch.equal(fisher.finish(buf), 2 * g * g)


def test_unknown_or_ill_formed_signals_are_refused():
    with pytest.raises(DPIConfigError, match=r"core_signal='hessian' is not a known signal.*'fisher' \(Σg²"):
        get_signal("hessian")
    with pytest.raises(DPIConfigError, match="already registered"):
        register_signal(Signal("fisher", "Σg²", "again", accumulate=_add_abs, finish=abs))
    with pytest.raises(DPIConfigError, match="computed one way"):
        Signal("half", "?", "accumulate without finish", accumulate=_add_abs)
    with pytest.raises(DPIConfigError, match="computed one way"):
        Signal("both", "?", "gradients and weights", accumulate=_add_abs, finish=abs,
               from_weights=signals.update_magnitudes)


def test_a_registered_signal_works_everywhere(gradabs):
    from dpi_hf import CoreProbeCallback

    from conftest import dpi_args

    assert signals.validate_signal("gradabs") == "gradabs" and "gradabs" in signals.gradient_signals()
    # computed: the accumulator adds each step's |g|
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    acc = ImportanceAccumulator(lin, "gradabs")
    grads = []
    for _ in range(3):
        lin.zero_grad()
        lin(torch.randn(5, 4)).pow(2).sum().backward()
        grads.append(lin.weight.grad.clone())
        acc.accumulate()
    assert torch.allclose(acc.importance()["weight"], sum(g.abs() for g in grads))
    # the probe callback reads it as a gradient signal: no θ0 copy, and allowed without optimizer steps
    cb = CoreProbeCallback(core_fraction=0.25, signal="gradabs", update_weights=False)
    cb.on_train_begin(SimpleNamespace(fp16=False), None, None, model=lin)
    assert cb.reference is None and cb._accumulator is not None
    lin.zero_grad()
    lin(torch.randn(5, 4)).pow(2).sum().backward()
    cb.on_pre_optimizer_step(None, None, None, model=lin)
    assert lin.weight.grad is None  # update_weights=False drops the gradients after reading them
    assert cb.select(lin).count() == int(0.25 * (4 * 3 + 3))
    # the config accepts it, and checks it as a gradient signal (fp16 loss scaling would corrupt it)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        assert dpi_args(Path(d), core_signal="gradabs", probe_updates_weights=False).core_signal == "gradabs"
        with pytest.raises(DPIConfigError, match="gradabs"):
            dpi_args(Path(d), core_signal="gradabs", fp16=True)
    # judged: an unreliable core's warning gives the signal's own fix
    assert reliability._probe_fix("gradabs") == gradabs.unreliable_fix


def test_weight_signals_need_steps():
    from dpi_hf import CoreProbeCallback

    with pytest.raises(DPIConfigError, match=r"\|θ−θ0\|\) would be zero everywhere.*'fisher' or 'gradsum'"):
        CoreProbeCallback(signal="update", update_weights=False)
    assert reliability._probe_fix("update") == get_signal("update").unreliable_fix != get_signal("fisher").unreliable_fix
    assert reliability._probe_fix(None) == get_signal("update").unreliable_fix
