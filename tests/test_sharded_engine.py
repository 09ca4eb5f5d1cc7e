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
    assert rep[0]["cases"] == rep[1]["cases"] == 289
    assert rep[0]["digest"] == rep[1]["digest"]  # the same CoreMask on every rank
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
