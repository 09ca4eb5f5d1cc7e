"""The engine on sharded models: distributed exact selection, θ0 local shards, ZeRO-3 index maps, memory model.

The torchrun tests launch 2 CPU processes (gloo) with FSDP2 DTensors; the rest run in this process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def reports(path):
    return [json.loads(Path(f"{path}.{r}").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_selection_equals_one_process(tmp_path):
    """Random sharded tensors, uneven and empty shards, heavy ties, bf16, both scopes, all three selection paths:
    the cores equal the one-process cores element for element (checked inside the script on every rank)."""
    r = torchrun("sharded_select.py", tmp_path / "rep")
    assert r.returncode == 0, r.stderr[-4000:]
    rep = reports(tmp_path / "rep")
    # each case: every rank's ShardedCoreMask holds exactly its rows of the one-process core, with global counts,
    # and gather() builds the one-process core on rank 0
    assert rep[0]["cases"] == rep[1]["cases"] == 289
    for rank in range(2):
        errors = rep[rank]["errors"]
        # a NaN on rank 1 only is raised on both ranks, naming the tensor, for both scopes
        for scope in ("global", "per_tensor"):
            assert "'layer4.weight'" in errors[f"nan_{scope}"] and "diverged" in errors[f"nan_{scope}"]
        assert "different tensors" in errors["different"]
        assert "Shard(0) only" in errors["shard1"] and "tensor parallel" in errors["shard1"]
        assert "Shard(0) only" in errors["replicate"]
        assert "2-D device mesh" in errors["mesh2d"] and "HSDP" in errors["mesh2d"]
    assert rep[0]["errors"]["nan_global"].startswith("rank 1: ")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_probe_select_freeze_and_resume(tmp_path):
    """A tiny Llama (301K params) under fully_shard on 2 ranks: θ0 is half per rank, the probe's core equals the
    one-process core element for element, frozen values stay bit-identical through a stage, and a stage killed
    with SIGKILL mid-way resumes from per-rank state to the same final shards."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPTS / "fsdp2_probe.py"), "single", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun("fsdp2_probe.py", "probe", out)
    assert r.returncode == 0, r.stderr[-4000:]
    print(r.stdout)  # the measured θ0 bytes per rank
    probe = [json.loads(Path(f"{out}.probe.{rank}").read_text()) for rank in range(2)]
    for rep in probe:
        assert rep["same_as_one_process"] and rep["same_as_gathered"] and rep["per_tensor_same_as_gathered"]
        assert rep["count"] == 6030  # ⌊0.02 · 301,536⌋
        assert 0 < rep["local_count"] < 6030  # each rank holds only the core elements of its own rows
        assert rep["restored_exact"]
        assert rep["frozen_identical"] and rep["moved"] > 250_000
        # θ0 per rank: about half of the model (the shards of this model are even)
        assert 0.45 <= rep["theta0_bytes"] / rep["full_bytes"] <= 0.55
    assert probe[0]["theta0_bytes"] + probe[1]["theta0_bytes"] == probe[0]["full_bytes"]
    assert probe[0]["local_count"] + probe[1]["local_count"] == 6030

    killed = tmp_path / "killed"
    (tmp_path / "killed.core.pt").write_bytes(Path(f"{out}.core.pt").read_bytes())
    r = torchrun("fsdp2_probe.py", "stage", killed, "--kill-at", "2")
    assert r.returncode != 0 and "SIGKILL" in r.stderr  # rank 0 died mid-stage, taking the run down
    assert not Path(f"{killed}.stage.0").exists()
    r = torchrun("fsdp2_probe.py", "stage", killed, "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in range(2):
        rep = json.loads(Path(f"{killed}.stage.{rank}").read_text())
        assert rep["resumed_at"] in (2, 3)  # after the last step both ranks had saved
        assert rep["frozen_identical"]
        assert rep["final"] == probe[rank]["final"]  # bit-identical shards to the uninterrupted stage


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_multitask_pieces_equal_one_process(tmp_path):
    """The multi-task DPITrainer's pieces on a fully_shard tiny Llama with tied embeddings, 2 ranks: θ0 half per
    rank, Σg² probes per shard, per-rank core parts (ShardedCoreMask) that gather to the one-process cores, the same
    plan, stage state saved by DPITrainer's own code as one safetensors file of local shards per rank, stage 2 with
    the first core frozen on the local shards (bit-identical), a resume from the per-rank files, and final weights
    equal to the unsharded run's bit for bit; probe_affinity's gradient dot products under FSDP2 equal the one
    process's."""
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, str(SCRIPTS / "fsdp2_pieces.py"), "single", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun("fsdp2_pieces.py", "sharded", out)
    assert r.returncode == 0, r.stderr[-4000:]
    single = json.loads(Path(f"{out}.single.0").read_text())
    ranks = [json.loads(Path(f"{out}.sharded.{rank}").read_text()) for rank in range(2)]
    assert single["tied"] and single["stage_file"] == "stage-0.safetensors"
    assert single["plan"]["stages"] == [["a"], ["b"]] and single["frozen_count"] == single["core_counts"]["a"]
    for rank, rep in enumerate(ranks):
        assert rep["tied"] and rep["theta0_fraction"] == 0.5
        assert rep["sharded_cores"] == "ShardedCoreMask"
        assert rep["core_counts"] == single["core_counts"]  # global counts on every rank
        assert rep["plan"] == single["plan"]  # overlaps computed by collectives: the same plan
        assert rep["stage_file"] == f"stage-0.rank{rank}-of-2.safetensors"
        assert rep["frozen_count"] == single["frozen_count"]
        assert rep["frozen_identical"] and rep["moved"] == single["moved"] > 100_000
        assert rep["final"] == single["final"]  # bit-identical to the unsharded run
        assert rep["resumed_exact"] and rep["resumed_final"] == single["final"] and rep["resumed_frozen_identical"]
        assert "another number of processes" in rep["other_world_error"]
        assert rep["shard_mask_equal"]
        assert rep["union_with_global"] == single["union_with_global"]
        # probe_affinity's dot products: all-reduced from the local shards, the one process's from its files (float64
        # sums in another order: equal to rounding); nothing kept once the last task is recorded
        for key in ("aa", "bb", "ba"):
            assert rep["affinity_dots"][key] == pytest.approx(single["affinity_dots"][key], rel=1e-9)
        assert rep["affinity_dots"]["kept_after_last"] == single["affinity_dots"]["kept_after_last"] == 0
        assert single["affinity_dots"]["aa"] > 0 and single["affinity_dots"]["ba"] != 0
        assert rep["intersection"] == single["intersection"]
    for task, count in single["core_counts"].items():
        assert ranks[0]["local_counts"][task] + ranks[1]["local_counts"][task] == count
        assert 0 < ranks[0]["local_counts"][task] < count
    assert ranks[0]["cores"] == single["cores"]  # gathered on rank 0, saved, reloaded: the one-process cores
    assert "cores" not in ranks[1]


# ------------------------------------------------------------------------------------------------ in process
def test_snapshot_and_restore_plain_model():
    import torch

    from dpi_hf.callbacks import snapshot_parameters as from_callbacks
    from dpi_hf.core import restore_parameters, snapshot_parameters
    from dpi_hf.core.errors import DPIConfigError

    assert from_callbacks is snapshot_parameters
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    model[0].bias.requires_grad_(False)
    snap = snapshot_parameters(model)
    assert list(snap) == ["0.weight", "1.weight", "1.bias"]
    assert list(snapshot_parameters(model, include_frozen=True)) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert snap["1.weight"].dtype == torch.bfloat16 and snap["0.weight"].device.type == "cpu"
    restore_parameters(model, snap)
    for n, p in model.named_parameters():
        if n != "0.bias":
            assert torch.equal(p.view(torch.int16 if p.dtype == torch.bfloat16 else torch.int32),
                               before[n].view(torch.int16 if p.dtype == torch.bfloat16 else torch.int32))
    with pytest.raises(DPIConfigError, match="'nope'"):
        restore_parameters(model, {"nope": torch.zeros(1)})
    with pytest.raises(DPIConfigError, match="same world size"):
        restore_parameters(model, {"0.weight": torch.zeros(2, 4)})


@pytest.mark.parametrize("numel", [1, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_zero3_partition_and_local_indices(numel, world):
    """The ZeRO-3 flat partition map against a fake partitioner that pads and splits like DeepSpeed."""
    import torch

    from dpi_hf.core.sharding import zero3_local_indices, zero3_partition

    size = -(-numel // world)
    padded = torch.cat([torch.arange(numel), torch.full((size * world - numel,), -1)])
    partitions = padded.split(size)  # what rank r holds in ds_tensor: its slice of the padded flat tensor
    g = torch.Generator().manual_seed(numel * 10 + world)
    flat = torch.randperm(numel, generator=g)[: max(1, numel // 2)].sort().values
    covered = []
    for rank in range(world):
        start, stop = zero3_partition(numel, world, rank)
        assert torch.equal(partitions[rank][: stop - start], torch.arange(start, stop))
        local, a, b = zero3_local_indices(flat, numel, world, rank)
        assert torch.equal(partitions[rank][local], flat[a:b])
        covered.append(flat[a:b])
    assert torch.equal(torch.cat(covered), flat)


class _FakeDeepSpeed:
    """Stands in for deepspeed.utils: fp32 master partitions and gradient partitions per ZeRO-3 parameter."""

    def __init__(self, model, world, rank):
        import torch

        from dpi_hf.core.sharding import zero3_partition

        self.master, self.grad = {}, {}
        for p in model.parameters():
            p.ds_id, p.ds_tensor, p.ds_numel, p.ds_shape = id(p), None, p.numel(), p.shape
            start, stop = zero3_partition(p.numel(), world, rank)
            size = -(-p.numel() // world)
            part = torch.zeros(size)  # padded like DeepSpeed's partitions
            part[: stop - start] = p.detach().reshape(-1)[start:stop].float()
            self.master[id(p)] = part
            self.grad[id(p)] = torch.ones(size)

    def safe_get_local_fp32_param(self, p):
        return self.master[id(p)].clone()

    def safe_set_local_fp32_param(self, p, value):
        self.master[id(p)].copy_(value)

    def safe_get_local_grad(self, p):
        return self.grad[id(p)].clone()

    def safe_set_local_grad(self, p, value):
        self.grad[id(p)].copy_(value)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_zero_freezer_and_snapshot_with_fake_partitioner(monkeypatch, rank):
    import types

    import torch

    from dpi_hf.core import CoreMask, restore_parameters, snapshot_parameters
    from dpi_hf.core.sharding import ZeroFreezer, zero3_partition

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake = _FakeDeepSpeed(model, world=3, rank=rank)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(utils=fake))
    monkeypatch.setattr("dpi_hf.core.sharding._world", lambda p: 3)
    monkeypatch.setattr("dpi_hf.core.sharding._rank", lambda p: rank)
    snap = snapshot_parameters(model)
    for n, p in model.named_parameters():
        start, stop = zero3_partition(p.numel(), 3, rank)
        assert torch.equal(snap[n], full[n].reshape(-1)[start:stop])  # this rank's fp32 partition, no padding
    g = torch.Generator().manual_seed(rank)
    frozen = CoreMask.from_dense({n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()})
    freezer = ZeroFreezer(model, frozen, world_size=3, rank=rank)
    # a "step": every master element moves, gradients are all ones
    for p in model.parameters():
        fake.master[id(p)] += 0.5
    freezer.zero_frozen_grads()
    freezer.restore()
    for n, p in model.named_parameters():
        start, stop = zero3_partition(p.numel(), 3, rank)
        dense = frozen.dense(n).reshape(-1)[start:stop]
        master = fake.master[id(p)][: stop - start]
        grad = fake.grad[id(p)][: stop - start]
        assert torch.equal(master[dense], full[n].reshape(-1)[start:stop][dense])  # frozen: exact θ0 values
        assert torch.equal(master[~dense], full[n].reshape(-1)[start:stop][~dense] + 0.5)  # the rest moved
        assert torch.all(grad[dense] == 0) and torch.all(grad[~dense] == 1)
    restore_parameters(model, snap)
    for n, p in model.named_parameters():
        start, stop = zero3_partition(p.numel(), 3, rank)
        assert torch.equal(fake.master[id(p)][: stop - start], full[n].reshape(-1)[start:stop])


def test_deepspeed_config_checks():
    from dpi_hf.core.errors import DPIConfigError
    from dpi_hf.core.sharding import check_deepspeed_config

    check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})
    with pytest.raises(DPIConfigError, match="ZeRO\\+\\+.*turn off"):
        check_deepspeed_config({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}})
    with pytest.raises(DPIConfigError, match="offload_optimizer.device='cpu'.*'none'"):
        check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})


def test_engine_memory_per_rank():
    import torch

    from dpi_hf.core import engine_memory_per_rank

    n = 6_738_415_616  # Llama-2-7B
    m = engine_memory_per_rank(n, world_size=8)
    local = -(-n // 8)
    assert m["theta0_shard"] == local * 2  # bf16 θ0 shard
    assert m["signal"] == local * 4  # one fp32 accumulator per local element
    assert m["frozen"] == int(0.03 * local) * (4 + 2)  # int32 position + bf16 value
    # each rank holds its rows' part of each core: int32 indices beat a 1-bit mask at p = 1%
    assert m["cores"] == 5 * int(0.01 * local) * 4
    assert m["total"] == m["theta0_shard"] + m["signal"] + m["frozen"] + m["cores"]
    assert m["bytes_per_parameter"]["theta0_shard"] == pytest.approx(2 / 8, rel=1e-6)
    fp32 = engine_memory_per_rank(n, world_size=8, param_dtype=torch.float32)
    assert fp32["theta0_shard"] == 2 * m["theta0_shard"]
    # at p = 5% a packed bitmask (1 bit) is smaller than int32 indices (1.6 bits)
    assert engine_memory_per_rank(n, core_fraction=0.05)["cores"] == 5 * -(-local // 8)
