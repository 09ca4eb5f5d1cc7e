"""The DPI engine on an FSDP2-sharded tiny Llama (CPU, gloo), launched by tests with torchrun, 2 processes.

Modes (every mode uses the same model init and the same batches: every rank trains on the same batch, so that the
all-reduced gradient equals the one-process gradient bit for bit and θ after a probe is the one-process θ):

* ``single OUT``: one process, no sharding: probe → |θ − θ0| → ``select_core``; writes the core to OUT.core.pt.
* ``probe OUT``: 2 ranks, ``fully_shard``: θ0 snapshot (local shards only, bytes measured), probe, distributed
  ``select_core`` on the shards; compares with the gathered-tensor selection and with OUT.core.pt; then a frozen
  stage (``ParameterFreezer``) from θ0 restored with ``restore_parameters``, saving per-rank state every step.
* ``stage OUT --kill-at K`` / ``stage OUT --resume``: the frozen stage alone, SIGKILLed after step K, then resumed
  from the per-rank state; the final shards must equal the uninterrupted run's.

Writes OUT.<rank> (JSON) for the test to check.
"""

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch

from dpi_hf.core import CoreMask, ParameterFreezer, restore_parameters, select_core, snapshot_parameters
from dpi_hf.core import update_magnitudes

STEPS_PROBE, STEPS_STAGE, P = 3, 6, 0.02


def build_model(tie_word_embeddings=False):
    """The tiny Llama of the FSDP2 scripts (fsdp2_pieces.py uses it with tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(cfg)


def batch(step, task):
    """Seeded token ids (4 rows of 16) for ``step`` of ``task``: the same on every rank and in one process."""
    g = torch.Generator().manual_seed(1000 * task + step)
    return torch.randint(0, 512, (4, 16), generator=g)


def train(model, steps, task, opt, start=0, after_step=None):
    for step in range(start, steps):
        ids = batch(step, task)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(step)


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def digest_local(model):
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode())
        h.update(p.detach().to_local().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_mask(a, b):
    """Whether two global masks are equal; for a ShardedCoreMask ``a`` (every rank calls this): whether this rank
    holds exactly ``b``'s elements of its rows with ``b``'s counts, and (on rank 0) whether ``a.gather()`` is ``b``."""
    if hasattr(a, "gather"):
        gathered = a.gather()
        local = a.names() == b.names() and a.count() == b.count() and all(
            torch.equal(a.indices(n), _in_range(b.indices(n), *a.local_range(n))) for n in a.names())
        return local and (gathered is None or same_mask(gathered, b))
    return a.names() == b.names() and all(
        a.shape(n) == b.shape(n) and torch.equal(a.indices(n).long(), b.indices(n).long()) for n in a.names())


def _in_range(idx, lo, hi):
    return idx[(idx >= lo) & (idx < hi)]


def single(out):
    torch.set_num_threads(1)
    model = build_model()
    theta0 = snapshot_parameters(model)
    train(model, STEPS_PROBE, 1, make_opt(model))
    core = select_core(update_magnitudes(model, theta0), P)
    torch.save({n: (core.shape(n), core.indices(n)) for n in core.names()}, f"{out}.core.pt")


def load_core(path):
    saved = torch.load(path)
    return CoreMask.from_indices({n: idx for n, (_, idx) in saved.items()},
                                 shapes={n: shape for n, (shape, _) in saved.items()})


def save_state(model, opt, step, state_dir, rank):
    # engine-level per-rank checkpoint: the local shards and the local optimizer state, written atomically
    state = {"step": step, "params": snapshot_parameters(model, include_frozen=True),
             "opt": {n: {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in opt.state[p].items()}
                     for n, p in model.named_parameters()}}
    tmp = state_dir / f"rank{rank}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, state_dir / f"rank{rank}.step{step}.pt")
    # keep two steps: a kill can land after one rank saved step s and before the other did
    old = state_dir / f"rank{rank}.step{step - 2}.pt"
    if old.exists():
        old.unlink()


def load_state(model, opt, state_dir, rank):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    latest = max(int(f.name.split(".step")[1][:-3]) for f in state_dir.glob(f"rank{rank}.step*.pt"))
    common = torch.tensor([latest])
    dist.all_reduce(common, op=dist.ReduceOp.MIN)  # the last step every rank saved
    state = torch.load(state_dir / f"rank{rank}.step{int(common)}.pt")
    restore_parameters(model, state["params"])
    for n, p in model.named_parameters():
        opt.state[p] = {k: (DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                               stride=p.stride()) if v.dim() else v)
                        for k, v in state["opt"][n].items()}
    return state["step"] + 1


def stage(model, core, state_dir, rank, kill_at=None, resume=False):
    opt = make_opt(model)
    start = load_state(model, opt, state_dir, rank) if resume else 0
    if resume:
        print(f"rank {rank}: resumed at step {start}", flush=True)
    # the freezer saves the frozen values the model holds now: θ0's, which a resumed model still holds exactly
    freezer = ParameterFreezer(model, core).attach(opt)

    def after(step):
        save_state(model, opt, step, state_dir, rank)
        if kill_at is not None and step == kill_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    train(model, STEPS_STAGE, 2, opt, start=start, after_step=after)
    freezer.detach()
    return start


def distributed(mode, out, kill_at, resume):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    full0 = {n: p.detach().clone() for n, p in model.named_parameters()}  # for the checks only, never the engine
    full_bytes = sum(t.numel() * t.element_size() for t in full0.values())
    shard(model)
    state_dir = Path(f"{out}.state")
    state_dir.mkdir(exist_ok=True)
    report = {}
    core_1p = load_core(f"{out}.core.pt")
    if mode == "probe":
        theta0 = snapshot_parameters(model)
        theta0_bytes = sum(t.numel() * t.element_size() for t in theta0.values())
        print(f"rank {rank}: θ0 snapshot {theta0_bytes:,} bytes of {full_bytes:,} ({theta0_bytes / full_bytes:.3f})",
              flush=True)
        train(model, STEPS_PROBE, 1, make_opt(model))
        magnitudes = update_magnitudes(model, theta0)
        core = select_core(magnitudes, P)
        # the one-process selection on the gathered magnitudes of this very run (test-side gathering)
        gathered = {n: magnitudes[n].full_tensor() for n in magnitudes}
        core_gathered = select_core(gathered, P)
        core_per_tensor = select_core(magnitudes, P, scope="per_tensor")
        report.update(theta0_bytes=theta0_bytes, full_bytes=full_bytes, count=core.count(),
                      local_count=core.local_count(),
                      same_as_gathered=same_mask(core, core_gathered),
                      same_as_one_process=same_mask(core, core_1p),
                      per_tensor_same_as_gathered=same_mask(core_per_tensor, select_core(gathered, P,
                                                                                            scope="per_tensor")))
        restore_parameters(model, theta0)
        report["restored_exact"] = all(torch.equal(p.full_tensor().view(torch.int32), full0[n].view(torch.int32))
                                       for n, p in model.named_parameters())
    if mode == "probe" or resume or kill_at is not None:
        start = stage(model, core_1p, state_dir, rank, kill_at=kill_at, resume=resume)
        identical, moved = True, 0
        for n, p in model.named_parameters():
            full = p.full_tensor().detach()
            idx = core_1p.indices(n).long()
            identical &= torch.equal(full.reshape(-1)[idx].view(torch.int32), full0[n].reshape(-1)[idx].view(torch.int32))
            moved += int((full != full0[n]).sum())
        report.update(frozen_identical=identical, moved=moved, final=digest_local(model),
                      resumed_at=start)
    with open(f"{out}.{mode}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "probe", "stage"])
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if args.mode == "single":
        single(args.out)
    else:
        distributed(args.mode, args.out, args.kill_at, args.resume)
