"""Kill/resume and 2-process DDP runs of DPITrainer, each in processes of their own (tiny model, CPU, gloo)."""

import json
import multiprocessing
from multiprocessing import forkserver
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpi_hf import load_cores
from dpi_hf.artifacts import load_dpi_artifacts

SCRIPT = Path(__file__).parent / "scripts" / "run_dpi.py"
pytestmark = pytest.mark.slow


def run(*args, torchrun=False):
    """run_dpi.py with ``args`` in a process of its own (SIGKILL ends only that one): two ranks under torchrun, or
    one child forked from a server that imported torch, transformers, trl and dpi_hf once for the whole module."""
    if not torchrun:
        return _run_forked(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(SCRIPT), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


_forkserver = None


def _run_forked(args) -> subprocess.CompletedProcess:
    global _forkserver
    if _forkserver is None:
        if str(SCRIPT.parent) not in sys.path:
            sys.path.insert(0, str(SCRIPT.parent))
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(["run_dpi"])
        # the server starts as `python -c ...` with this environment: it finds run_dpi through PYTHONPATH (a failed
        # preload is silent, and every child would import everything again)
        saved = dict(os.environ)
        path = [str(SCRIPT.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    import run_dpi

    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        child = _forkserver.Process(target=run_dpi.run_in_child, args=([str(a) for a in args], str(out), str(err)))
        child.start()
        child.join(600)
        if child.exitcode is None:  # hung: fail as subprocess.run(timeout=...) would, never look like a SIGKILL
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["run_dpi.py", *args], 600, err.read_text() if err.exists() else "")
        return subprocess.CompletedProcess(["run_dpi.py", *args], child.exitcode,
                                           out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")


def report(path):
    return json.loads(Path(f"{path}.0").read_text())


def assert_frozen_intact(out: Path):
    cores, plan = load_dpi_artifacts(out)
    for k in range(1, len(plan.stages)):
        frozen = plan.frozen_before(k)
        before = load_file(str(out / f"stage-{k - 1}" / "model.safetensors"))
        after = load_file(str(out / f"stage-{k}" / "model.safetensors"))
        for name in frozen.names():
            idx = frozen.indices(name)
            a, b = before[name].reshape(-1)[idx], after[name].reshape(-1)[idx]
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (k, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run(str(out / "run"), "--report", str(out / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "run", report(out / "rep")


def _artifact_bytes(out: Path) -> dict:
    """What a finished run states about itself: the bytes of plan and model card, and the cores file's metadata and
    the bytes of each of its tensors (safetensors writes its metadata keys in a per-process hash order, so the
    header alone may differ between two processes writing the same content)."""
    from safetensors import safe_open

    with safe_open(str(out / "dpi" / "cores.safetensors"), framework="pt") as f:
        cores = {"metadata": f.metadata(), **{k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}}
    return {"cores": cores, **{name: (out / name).read_bytes() for name in ("dpi/plan.json", "README.md")}}


# kill points spread over a run: mid probe (a Trainer step), after a probe's cores are written, after the plan and
# artifacts, mid stage (checkpoints exist), after a stage's weights are saved but before its progress is recorded,
# and after the final card (a finished run resumed)
KILL_POINTS = ["probe-rev:2", "point:after-probe-add", "point:after-plan", "stage-1:2",
               "point:after-stage-0-save", "point:after-card"]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference, kill_at):
    ref_out, ref = reference
    out = tmp_path / "run"
    how = ["--kill-point", kill_at.split(":", 1)[1]] if kill_at.startswith("point:") else ["--kill-at", kill_at]
    killed = run(str(out), *how)
    assert killed.returncode == -9, killed.stderr[-3000:]
    probes = out / "_dpi_runs" / "probes"
    if kill_at.startswith("probe"):
        assert (probes / "add.safetensors").is_file() and not (probes / "rev.safetensors").exists()
    elif kill_at.startswith("stage"):
        assert json.loads((out / "_dpi_runs" / "progress.json").read_text())["finished_stages"] == [0]
        assert any((out / "_dpi_runs" / "stage-1").glob("checkpoint-*"))
    resumed = run(str(out), "--resume", "--report", str(tmp_path / "rep"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if kill_at.startswith("stage"):
        assert "resuming after stage 1" in resumed.stderr + resumed.stdout
        assert "probe 1/3 add already done" in resumed.stderr + resumed.stdout
    rep = report(tmp_path / "rep")
    assert rep["cores"] == ref["cores"] and rep["stages"] == ref["stages"] and rep["jaccard"] == ref["jaccard"]
    ref_cores, _ = load_dpi_artifacts(ref_out)
    cores, _ = load_dpi_artifacts(out)
    assert all(cores[t] == ref_cores[t] for t in ref_cores)
    assert_frozen_intact(out)
    assert rep["params"] == ref["params"]  # resume is exact: same final weights as the uninterrupted run
    assert _artifact_bytes(out) == _artifact_bytes(ref_out)  # cores, plan and card bit-identical


def test_kill_between_stage_weights_and_progress_without_checkpoints(tmp_path, reference):
    """Without Trainer checkpoints a resumed stage restarts from the previous stage's weights, which the kill must
    not have overwritten: the weights after stage k have a file of their own until progress.json records k."""
    ref_out, ref = reference
    out = tmp_path / "run"
    assert run(str(out), "--no-checkpoints", "--kill-point", "after-stage-1-save").returncode == -9
    assert json.loads((out / "_dpi_runs" / "progress.json").read_text())["finished_stages"] == [0]
    resumed = run(str(out), "--no-checkpoints", "--resume", "--report", str(tmp_path / "rep"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert report(tmp_path / "rep")["params"] == ref["params"]
    assert sorted(p.name for p in (out / "_dpi_runs").glob("stage-*.safetensors")) == ["stage-2.safetensors"]


def test_resume_from_an_explicit_checkpoint_path(tmp_path, reference):
    ref_out, ref = reference
    out = tmp_path / "run"
    assert run(str(out), "--kill-at", "stage-1:4").returncode == -9  # checkpoints 1-3 saved, 4 not yet
    # a checkpoint of another phase is refused with the expected path, before anything changes
    wrong = out / "_dpi_runs" / "stage-0"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = run(str(out), "--resume", str(wrong / "checkpoint-1"))
    assert bad.returncode != 0 and "not a checkpoint of the stage this run continues with" in bad.stderr
    assert "stage-1/checkpoint-<step>" in bad.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the stage's own earlier checkpoint is honoured: training continues from step 2, not from the latest (3)
    ckpt = out / "_dpi_runs" / "stage-1" / "checkpoint-2"
    assert ckpt.is_dir() and (out / "_dpi_runs" / "stage-1" / "checkpoint-3").is_dir()
    good = run(str(out), "--resume", str(ckpt), "--report", str(tmp_path / "rep"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert "stage-1 begins at step 2" in good.stdout
    assert report(tmp_path / "rep")["params"] == ref["params"]


@pytest.mark.distributed
def test_ddp_two_processes(tmp_path):
    out = tmp_path / "run"
    r = run(str(out), "--report", str(tmp_path / "rep"), torchrun=True)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads(Path(f"{tmp_path / 'rep'}.{i}").read_text()) for i in range(2)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0] == ranks[1]  # identical parameters, cores and plan on both ranks
    assert_frozen_intact(out)
    assert list(load_cores(out / "dpi" / "cores.safetensors")) == ["add", "rev", "upper"]


@pytest.mark.distributed
def test_ddp_two_processes_with_fusion(tmp_path):
    """fusion='cpi' under DDP: only rank 0 fuses, every rank loads the same fused file and ends identical."""
    out = tmp_path / "run"
    r = run(str(out), "--fusion", "--report", str(tmp_path / "rep"), torchrun=True)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads(Path(f"{tmp_path / 'rep'}.{i}").read_text()) for i in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0] == ranks[1]
    assert (out / "dpi" / "transplant.safetensors").is_file() and (out / "_dpi_runs" / "fused.safetensors").is_file()
    assert_frozen_intact(out)


@pytest.mark.distributed
def test_fsdp2_sharded_freeze(tmp_path):
    """FSDP2 shards parameters on dim 0 across 2 CPU ranks; the mask is applied per local shard."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / "scripts" / "fsdp2_freeze.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "rep")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    reports = [json.loads(Path(f"{tmp_path / 'rep'}.{i}").read_text()) for i in range(2)]
    for rep in reports:
        assert rep["frozen_identical"] and rep["moved"] > 0
    # really sharded: the 32x16 weight is 16x16 on each rank, the 7-row weight splits 4 + 3
    assert reports[0]["local_rows"][0] == [16, 16] and reports[1]["local_rows"][0] == [16, 16]
    assert reports[0]["local_rows"][2][0] == 4 and reports[1]["local_rows"][2][0] == 3


@pytest.fixture(scope="module")
def fusion_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion-ref")
    r = run(str(out / "run"), "--fusion", "--report", str(out / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "run", report(out / "rep")


def _tensors(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {"metadata": f.metadata(), **{k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}}


# with fusion="cpi": mid probe (the probe models written so far are kept), after the transplant map but before the
# fused weights (the fusion runs again), after the fused weights (they are reloaded), mid first stage (its checkpoint)
FUSION_KILL_POINTS = ["probe-rev:2", "point:during-fusion", "point:after-fusion", "stage-0:2"]


@pytest.mark.parametrize("kill_at", FUSION_KILL_POINTS)
def test_fusion_sigkill_then_resume_matches_uninterrupted(tmp_path, fusion_reference, kill_at):
    ref_out, ref = fusion_reference
    out = tmp_path / "run"
    how = ["--kill-point", kill_at.split(":", 1)[1]] if kill_at.startswith("point:") else ["--kill-at", kill_at]
    killed = run(str(out), "--fusion", *how)
    assert killed.returncode == -9, killed.stderr[-3000:]
    runs = out / "_dpi_runs"
    fused_written = (runs / "fused.safetensors").is_file()
    assert fused_written == (kill_at in ("point:after-fusion", "stage-0:2"))
    if kill_at == "point:during-fusion":
        assert (out / "dpi" / "transplant.safetensors").is_file()
    resumed = run(str(out), "--fusion", "--resume", "--report", str(tmp_path / "rep"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert ("fusion already done" in log) == fused_written
    rep = report(tmp_path / "rep")
    assert rep["cores"] == ref["cores"] and rep["stages"] == ref["stages"]
    assert rep["params"] == ref["params"]  # the same final weights as the uninterrupted run
    for name in ("_dpi_runs/fused.safetensors", "dpi/transplant.safetensors", "fused/model.safetensors"):
        assert _tensors(out / name) == _tensors(ref_out / name), name
    assert _artifact_bytes(out) == _artifact_bytes(ref_out)
    assert_frozen_intact(out)
