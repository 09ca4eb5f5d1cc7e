"""The multi-task DPITrainer's pieces on an FSDP2-sharded tiny Llama with tied embeddings (CPU, gloo).

Launched by tests with torchrun (2 processes) and once without it (``single``: the same pipeline, unsharded):
θ0 copied after sharding (local shards) → two probes from θ0 with the Σg² signal accumulated per shard → the
distributed core selection (each rank keeps its rows' part, a ShardedCoreMask) → the plan (overlap by collectives)
→ the cores gathered on rank 0 and saved → stage 1 (task A), its state saved by DPITrainer's own sharded-safetensors
code (one file of local shards per rank) → stage 2 (task B) with task A's core frozen on the local shards → a resume
of the state after stage 1 (weights perturbed, reloaded, bit-exact) and stage 2 run again from it.

Every rank trains on the same batch, so the all-reduced gradient equals the one-process gradient bit for bit: the
sharded run must equal the single run (cores, plan, final weights). Writes OUT.<mode>.<rank> (JSON).
"""

import argparse
import hashlib
import json
import types
from pathlib import Path

import torch

from dpi_hf.core import ParameterFreezer, plan_stages, restore_parameters, select_core, snapshot_parameters
from dpi_hf.core import load_cores, save_cores
from dpi_hf.core.signals import ImportanceAccumulator

import fsdp2_probe  # the same tiny Llama and batches (this script's folder is on sys.path when it runs)

PROBE_STEPS, STAGE_STEPS, P = 3, 4, 0.02


def build_model():
    return fsdp2_probe.build_model(tie_word_embeddings=True)  # tied: one tensor shared by two modules (as Llama-3.2-1B)


batch = fsdp2_probe.batch


def train(model, steps, task, before_step=None, freezer_mask=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    freezer = ParameterFreezer(model, freezer_mask).attach(opt) if freezer_mask is not None else None
    for step in range(steps):
        ids = batch(step, task)
        model(input_ids=ids, labels=ids).loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        opt.zero_grad()
    if freezer is not None:
        freezer.detach()


def probe(model, theta0, task, sums=None):
    """The task's core from a 3-step Σg² probe from θ0; with ``sums``, its signed gradient sum is kept there (what
    probe_affinity records)."""
    restore_parameters(model, theta0)
    acc = ImportanceAccumulator(model, "fisher", keep_signed_sum=sums is not None)
    train(model, PROBE_STEPS, task, before_step=acc.accumulate)
    core = select_core(acc.importance(), P)
    if sums is not None:
        sums[task] = acc.signed_sum()
    acc.release()
    return core


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def digest(model):
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode())
        h.update(bits(full(p)).numpy().tobytes())
    return h.hexdigest()


def mask_lists(mask):
    return {n: mask.indices(n).tolist() for n in mask.names()}


def stub_trainer(model, runs_dir, rank, world):
    """The attributes DPITrainer's stage-state methods read, around this model (DPITrainer itself needs accelerate,
    which turns FSDP on only for accelerators)."""
    from dpi_hf.trainer.trainer import DPITrainer

    stub = types.SimpleNamespace(model=model, _runs_dir=runs_dir,
                                 accelerator=types.SimpleNamespace(num_processes=world, process_index=rank),
                                 is_world_process_zero=lambda: rank == 0)
    stub._sharded = DPITrainer._sharded.fget(stub)
    bind = {m: getattr(DPITrainer, m).__get__(stub) for m in ("_stage_state_path", "_save_stage_state",
                                                             "_load_stage_state")}
    stub.__dict__.update(bind)
    return stub


def affinity_dots(model, sums, runs, rank, world):
    """DPITrainer._record_gradient on these probes' signed sums (task 1, then task 2, the last): the dot products
    probe_affinity records — from files of full sums on one process, all-reduced from the local shards under FSDP2."""
    from dpi_hf.trainer.trainer import DPITrainer

    runs.mkdir(exist_ok=True)
    (runs / "probes").mkdir(exist_ok=True)
    phase = types.SimpleNamespace(train_loss=1.0, seconds=0.0, cpu_seconds=0.0)
    stub = types.SimpleNamespace(_runs_dir=runs, phase_records=[phase], is_world_process_zero=lambda: rank == 0,
                                 accelerator=types.SimpleNamespace(wait_for_everyone=lambda: None))
    stub._gradient_path = DPITrainer._gradient_path.__get__(stub)
    record = DPITrainer._record_gradient.__get__(stub)
    probes = {t: types.SimpleNamespace(gradient_sum=s, gradient_steps=PROBE_STEPS) for t, s in sums.items()}
    first = record("a", probes[1], [], last=False)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    second = record("b", probes[2], ["a"], last=True)
    return {"aa": first["dots"]["a"], "bb": second["dots"]["b"], "ba": second["dots"]["a"],
            "kept_after_last": len(stub._sharded_gradient_sums)}


def run(mode, out):
    torch.set_num_threads(1)
    rank, world = 0, 1
    if mode == "sharded":
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if mode == "sharded":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    report = {"tied": model.lm_head.weight is model.model.embed_tokens.weight}
    theta0 = snapshot_parameters(model)  # after sharding: this rank's shards only
    report["theta0_fraction"] = sum(t.numel() * t.element_size() for t in theta0.values()) / full_bytes

    sums = {}
    cores = {"a": probe(model, theta0, 1, sums), "b": probe(model, theta0, 2, sums)}
    report["affinity_dots"] = affinity_dots(model, sums, Path(f"{out}.{mode}.runs"), rank, world)
    report["sharded_cores"] = type(cores["a"]).__name__
    report["core_counts"] = {t: c.count() for t, c in cores.items()}
    report["local_counts"] = {t: (c.local_count() if hasattr(c, "local_count") else c.count())
                              for t, c in cores.items()}
    plan = plan_stages(cores, jaccard_threshold=1.0)  # τ = 1: one stage per task, b's stage freezes a's core
    report["plan"] = {"stages": plan.stages, "jaccard": plan.jaccard, "counts": plan.core_counts}

    gathered = {t: (c.gather() if hasattr(c, "gather") else c) for t, c in cores.items()}
    runs = Path(f"{out}.{mode}.runs")
    runs.mkdir(exist_ok=True)
    if rank == 0:
        save_cores(gathered, runs / "cores.safetensors", model=None)
        report["cores"] = {t: mask_lists(m) for t, m in load_cores(runs / "cores.safetensors").items()}

    if mode == "sharded":
        dist.barrier()
    # a resume or masks_from loads global masks on every rank; shard_mask keeps this rank's rows, which must be the
    # part the selection gave it; a union with a global mask (protect_cores_from) counts over all ranks
    from dpi_hf.core.sharded_mask import shard_mask

    loaded = load_cores(runs / "cores.safetensors")
    report["shard_mask_equal"] = all(shard_mask(loaded[t], model) == cores[t] for t in cores)
    report["union_with_global"] = cores["b"].union(loaded["a"]).count()
    report["intersection"] = cores["b"].intersection(loaded["a"]).count()

    trainer = stub_trainer(model, runs, rank, world)
    restore_parameters(model, theta0)
    train(model, STAGE_STEPS, 1)  # stage 1: task a, nothing frozen
    trainer._save_stage_state(0)
    report["stage_file"] = trainer._stage_state_path(0).name
    after_stage1 = digest(model)

    frozen = plan.frozen_before(1)
    report["frozen_count"] = frozen.count()
    before = {n: bits(full(p)).clone() for n, p in model.named_parameters()}
    train(model, STAGE_STEPS, 2, freezer_mask=frozen)  # stage 2: task b, a's core frozen on the local shards
    gathered_frozen = gathered["a"] if rank == 0 else None

    def frozen_identical():
        ok, moved = True, 0
        for n, p in model.named_parameters():
            now = bits(full(p))
            moved += int((now != before[n]).sum())
            if gathered_frozen is not None:
                idx = gathered_frozen.indices(n)
                ok &= torch.equal(now.reshape(-1)[idx], before[n].reshape(-1)[idx])
        return ok, moved

    report["frozen_identical"], report["moved"] = frozen_identical()
    report["final"] = digest(model)

    # resume after stage 1: perturb, reload this rank's file, and run stage 2 again: the same final weights
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).add_(1.0)
    restore_parameters(model, trainer._load_stage_state(0))
    report["resumed_exact"] = digest(model) == after_stage1
    train(model, STAGE_STEPS, 2, freezer_mask=frozen)
    report["resumed_final"] = digest(model)
    report["resumed_frozen_identical"] = frozen_identical()[0]
    if mode == "sharded":  # another world size finds no file of its own: one clear error
        other = stub_trainer(model, runs, rank, world + 2)
        try:
            other._load_stage_state(0)
        except Exception as exc:  # DPIConfigError
            report["other_world_error"] = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{mode}.{rank}").write_text(json.dumps(report))
    if mode == "sharded":
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "sharded"])
    parser.add_argument("out")
    args = parser.parse_args()
    run(args.mode, args.out)
