"""A run's artifacts never describe something that did not happen: run identity, used output dirs, content
fingerprints and masks_from that must match (or be recorded as not matching)."""

import json

import pytest
import torch

from conftest import dpi_args, tiny_llama
from dpi_hf import DPITrainer, FingerprintMismatchError, load_cores, model_fingerprint
from dpi_hf.core import DPIConfigError
from dpi_hf.core.fingerprint import content_digest

torch.set_num_threads(1)


def _files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _trainer(tmp_path, tokenizer, tasks, seed=0, **kw):
    kw.setdefault("max_steps", 3)
    return DPITrainer(tiny_llama(tokenizer, seed=seed), args=dpi_args(tmp_path, **kw), train_dataset=tasks,
                      processing_class=tokenizer)


def test_content_digest_knows_the_weights():
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    assert model_fingerprint(a)["sha256"] == model_fingerprint(b)["sha256"]  # same architecture
    assert content_digest(a) != content_digest(b)  # other weights
    same = torch.nn.Linear(8, 4)
    same.load_state_dict(a.state_dict())
    assert content_digest(same) == content_digest(a)
    half = torch.nn.Linear(8, 4).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in a.state_dict().items()})
    assert content_digest(half) == content_digest(a)  # a bf16 copy of the same checkpoint


def test_resume_with_changed_settings_is_refused_and_changes_nothing(tmp_path, tokenizer, tasks):
    _trainer(tmp_path, tokenizer, tasks).train()
    out = tmp_path / "out"
    before = _files(out)
    changed = _trainer(tmp_path, tokenizer, tasks, jaccard_threshold=0.0, core_fraction=0.1)
    with pytest.raises(DPIConfigError) as e:
        changed.train(resume_from_checkpoint=True)
    msg = str(e.value)
    assert "jaccard_threshold: 0.3 → 0.0" in msg and "core_fraction: 0.05 → 0.1" in msg
    assert "overwrite_output_dir" in msg and "Restore them" in msg
    assert _files(out) == before  # the output_dir is untouched
    # the same settings resume (a finished run: nothing left to train, the artifacts stay what they were)
    _trainer(tmp_path, tokenizer, tasks).train(resume_from_checkpoint=True)
    assert json.loads((out / "dpi" / "plan.json").read_text())["stages"] == \
        json.loads(before[out / "dpi" / "plan.json"])["stages"]


def test_resume_with_other_data_is_refused(tmp_path, tokenizer, tasks):
    _trainer(tmp_path, tokenizer, tasks).train()
    other = dict(tasks, add=tasks["add"].select(range(20)))
    tr = DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, max_steps=3), train_dataset=other,
                    processing_class=tokenizer)
    with pytest.raises(DPIConfigError, match=r"tasks\.add\.digest.*tasks\.add\.rows: 24 → 20"):
        tr.train(resume_from_checkpoint=True)


def test_fresh_run_in_a_used_output_dir(tmp_path, tokenizer, tasks):
    _trainer(tmp_path, tokenizer, tasks).train()
    out = tmp_path / "out"
    stale = out / "_dpi_runs" / "stage-1" / "checkpoint-99"
    stale.mkdir(parents=True)
    before = _files(out)
    with pytest.raises(DPIConfigError, match="already holds a DPI run.*resume_from_checkpoint=True.*overwrite"):
        _trainer(tmp_path, tokenizer, tasks).train()
    assert _files(out) == before
    with pytest.raises(DPIConfigError, match="no interrupted DPI run"):
        _trainer(tmp_path / "elsewhere", tokenizer, tasks).train(resume_from_checkpoint=True)
    fresh = _trainer(tmp_path, tokenizer, tasks, overwrite_output_dir=True, jaccard_threshold=0.0)
    fresh.train()
    assert not stale.exists()  # no stale checkpoint survives to be resumed from later
    assert json.loads((out / "dpi" / "plan.json").read_text())["jaccard_threshold"] == 0.0


def test_masks_from_other_weights_is_refused_unless_allowed(tmp_path, tokenizer, tasks):
    src = _trainer(tmp_path / "src", tokenizer, tasks)
    src.probe()
    masks = str(tmp_path / "src" / "out")
    with pytest.raises(FingerprintMismatchError, match="other weights of this architecture.*allow_mask_mismatch"):
        _trainer(tmp_path / "b", tokenizer, tasks, seed=1, masks_from=masks)
    allowed = _trainer(tmp_path / "c", tokenizer, tasks, seed=1, masks_from=masks, allow_mask_mismatch=True)
    allowed.train()
    out = tmp_path / "c" / "out"
    record = json.loads((out / "dpi" / "plan.json").read_text())
    assert record["masks_source"]["other_weights"] and record["masks_other_weights"]
    assert "Accepted with allow_mask_mismatch" in (out / "README.md").read_text()
    # the same weights load without any flag
    same = _trainer(tmp_path / "d", tokenizer, tasks, masks_from=masks)
    assert all(same._preloaded_cores[t] == src.cores[t] for t in tasks)


def test_masks_from_records_the_masks_settings(tmp_path, tokenizer, tasks):
    _trainer(tmp_path / "src", tokenizer, tasks, core_fraction=0.05).probe()
    masks = str(tmp_path / "src" / "out")
    with pytest.raises(DPIConfigError, match=r"core_fraction: masks 0\.05, config 0\.1.*allow_mask_mismatch"):
        _trainer(tmp_path / "b", tokenizer, tasks, core_fraction=0.1, masks_from=masks)
    tr = _trainer(tmp_path / "c", tokenizer, tasks, core_fraction=0.1, masks_from=masks, allow_mask_mismatch=True)
    tr.train()
    out = tmp_path / "c" / "out"
    record = json.loads((out / "dpi" / "plan.json").read_text())
    assert record["core_fraction"] == 0.05  # what the cores are, not what the config said
    assert "core_fraction" in record["masks_mismatch"]
    meta_cores = load_cores(out / "dpi" / "cores.safetensors")
    assert all(c.count() == tr.plan.core_counts[t] for t, c in meta_cores.items())
    assert "core_fraction: 0.05" in (out / "README.md").read_text()


def test_masks_without_reliability_need_raw_overlap(tmp_path, tokenizer, tasks):
    _trainer(tmp_path / "src", tokenizer, tasks, probe_reliability="none", overlap="raw").probe()
    masks = str(tmp_path / "src" / "out")
    with pytest.raises(DPIConfigError, match="overlap='corrected' needs the split-half reliability"):
        _trainer(tmp_path / "b", tokenizer, tasks, masks_from=masks, probe_reliability="none")
    ok = _trainer(tmp_path / "c", tokenizer, tasks, masks_from=masks, probe_reliability="none", overlap="raw")
    ok.train()
    assert ok.plan.reliability is None and ok.plan.overlap == "raw"


def test_sharded_engines_refused_or_accepted_before_training(tmp_path, tokenizer, tasks, monkeypatch):
    """A multi-task run under DeepSpeed, or with CPI fusion under FSDP, stops with one clear error before any work;
    a multi-task run under FSDP2 is built (the sharded pieces: tests/test_sharded_engine.py, the GPU script)."""
    from transformers import Trainer

    original = Trainer.__init__
    engine = {}

    def sharded_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for key, value in engine.items():  # what accelerate sets under an FSDP / DeepSpeed launch config
            setattr(self, key, value)

    monkeypatch.setattr(Trainer, "__init__", sharded_init)
    engine.update(is_deepspeed_enabled=True)
    with pytest.raises(DPIConfigError, match="under DeepSpeed is not supported.*steps inside backward.*FSDP2"):
        _trainer(tmp_path, tokenizer, tasks)
    assert not (tmp_path / "out" / "dpi").exists()
    engine.update(is_deepspeed_enabled=False, is_fsdp_enabled=True)
    with pytest.raises(DPIConfigError, match="fusion='cpi' is not supported under FSDP"):
        _trainer(tmp_path, tokenizer, tasks, fusion="cpi")
    trainer = _trainer(tmp_path, tokenizer, tasks)
    assert trainer.tasks is not None and not (tmp_path / "out" / "dpi").exists()


def test_callbacks_refuse_what_they_cannot_do_exactly(tmp_path, tokenizer, tasks, monkeypatch):
    import dpi_hf.callbacks as cb
    from dpi_hf import CoreMask, CoreProbeCallback, FreezeMaskCallback
    from dpi_hf.core.errors import DPIConfigError as Err

    model = tiny_llama(tokenizer)
    frozen = CoreMask.from_dense({n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()})
    monkeypatch.setattr(cb, "_zero3_enabled", lambda: True)
    with pytest.raises(Err, match="cannot freeze exactly under DeepSpeed ZeRO-3"):
        FreezeMaskCallback(frozen).on_train_begin(None, None, None, model=model)
    with pytest.raises(Err, match="cannot read gradients under DeepSpeed ZeRO-3"):
        CoreProbeCallback(signal="fisher").on_train_begin(dpi_args(tmp_path), None, None, model=model)
    monkeypatch.setattr(cb, "_zero3_enabled", lambda: False)

    class FP16:
        fp16 = True

    with pytest.raises(Err, match="fp16 loss scaling"):
        CoreProbeCallback(signal="gradsum").on_train_begin(FP16(), None, None, model=model)


def test_task_names_that_collide_as_file_names(tmp_path, tokenizer, tasks):
    clash = {"a b": tasks["add"], "a_b": tasks["rev"]}
    with pytest.raises(DPIConfigError, match="both become the file name 'a_b'"):
        DPITrainer(tiny_llama(tokenizer), args=dpi_args(tmp_path, max_steps=3), train_dataset=clash,
                   processing_class=tokenizer)
