"""One Metric record per metric: evaluation, the train report, the comparison tables and plots all read it, so a new
metric is one registration."""

import pytest

from dpi_hf import DPIConfigError
from dpi_hf.compare import tables
from dpi_hf.evaluation import registry
from dpi_hf.evaluation.registry import HELDOUT_LOSS, METRIC_REGISTRY, Metric, evaluate_task, get_metric
from dpi_hf.evaluation.settings import EvalSpec
from dpi_hf.run.train import LOWER_IS_BETTER, format_table, summary_rows


def test_builtin_records():
    assert registry.METRICS == tuple(METRIC_REGISTRY) and HELDOUT_LOSS in METRIC_REGISTRY
    nll = get_metric(HELDOUT_LOSS)
    assert (nll.direction, nll.is_score, nll.generates, nll.label) == ("lower", False, False, "NLL")
    assert LOWER_IS_BETTER == {HELDOUT_LOSS}
    acc = get_metric("gsm8k_accuracy")
    assert (acc.direction, acc.is_score, acc.generates, acc.label, acc.digits) == ("higher", True, True, "acc %", 1)
    assert acc.format(12.345) == "12.3" and nll.format(None) == "-"
    assert acc.improved(10.0, 20.0) and nll.improved(2.0, 1.5) and not nll.improved(1.5, 2.0)
    assert acc.improved(None, 1.0) is None
    # the macro scale comes from the records: % / 10, fractions × 10, judge ratings as they are
    assert registry.normalised_score({"metric": "gsm8k_accuracy", "gsm8k_accuracy": 50.0}) == 5.0
    assert registry.normalised_score({"metric": "codebleu", "codebleu": 0.5}) == 5.0
    assert registry.normalised_score({"metric": "judge_score", "judge_score": 7.0}) == 7.0
    assert registry.normalised_score({"metric": HELDOUT_LOSS, HELDOUT_LOSS: 1.0}) is None
    with pytest.raises(DPIConfigError, match="valid metrics: gsm8k_accuracy"):
        get_metric("bleu")
    with pytest.raises(DPIConfigError, match="already registered"):
        registry.register_metric(nll)


@pytest.fixture
def custom_metrics(monkeypatch):
    """Two new metrics, registered for one test only: a score (higher is better) and a loss (lower is better)."""
    monkeypatch.setattr(registry, "METRIC_REGISTRY", dict(METRIC_REGISTRY))

    def exact(model, tokenizer, dataset, *, max_new_tokens=256, batch_size=8):
        hits = sum(row["completion"] == row["reference"] for row in dataset)
        return {"metric": "exact_match", "exact_match": 100.0 * hits / len(dataset), "n": len(dataset),
                "unparsable": 0, "max_new_tokens": max_new_tokens}

    def length(model, tokenizer, dataset, *, batch_size=8):
        return {"metric": "length", "length": sum(len(r["completion"]) for r in dataset) / len(dataset),
                "n": len(dataset), "unparsable": 0}

    registry.register_metric(Metric("exact_match", "EM %", True, exact, digits=1, to_ten=lambda v: v / 10.0))
    registry.register_metric(Metric("length", "chars", False, length, generates=False))


def test_a_registered_metric_works_everywhere(custom_metrics):
    rows = [{"prompt": "p", "completion": "a", "reference": "a", "task": "t"},
            {"prompt": "p", "completion": "b", "reference": "c", "task": "t"}]
    # evaluation: evaluate_task runs its scorer; the macro-average uses its scale, and skips the loss
    result = evaluate_task(None, None, rows, "exact_match", max_new_tokens=7)
    assert result["exact_match"] == 50.0 and result["max_new_tokens"] == 7 and result["task"] == "t"
    loss = evaluate_task(None, None, rows, "length")
    assert registry.macro_score([result, loss]) == 5.0
    # settings: a recipe may name it; only a generating metric gets max_new_tokens; a comparison scores only scores
    spec = EvalSpec(metrics={"t": ["length", "exact_match"]}, max_new_tokens=9)
    assert spec.metric_arguments("exact_match") == {"batch_size": 8, "max_new_tokens": 9}
    assert spec.metric_arguments("length") == {"batch_size": 8}
    assert spec.metrics_for("t") == ["exact_match"]
    assert EvalSpec(metrics={"t": "length"}).metrics_for("t") == [HELDOUT_LOSS]
    with pytest.raises(DPIConfigError, match="did you mean 'exact_match'"):
        EvalSpec(metrics={"t": "exact_mach"})
    # the train report: improvement in each metric's direction
    before = {"t": {"exact_match": {"exact_match": 50.0}, "length": {"length": 10.0}}}
    after = {"t": {"exact_match": {"exact_match": 40.0}, "length": {"length": 8.0}}}
    report = {r["metric"]: r["improved"] for r in summary_rows(before, after)}
    assert report == {"exact_match": False, "length": True}
    assert "length (lower is better)" in format_table(summary_rows(before, after))
    # tables: the record's label and decimals
    assert (tables._label("exact_match"), tables._digits("exact_match")) == ("EM %", 1)
