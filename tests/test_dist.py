"""Two real processes (gloo on CPU): shared state must stay identical on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import free_port, init_gloo, leave_gloo

pytestmark = pytest.mark.dist


def _bank_worker(rank: int, world: int, port: int, out: str) -> None:
    from instdisc import dist
    from instdisc.memory import MemoryBank
    from instdisc.methods.npid import estimate_log_z

    init_gloo(rank, world, port)
    torch.manual_seed(0)  # same initial bank on both ranks
    bank = MemoryBank(24, 4, momentum=0.5)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for step in range(3):
        idx = torch.arange(4) + 8 * step + 4 * rank
        bank.update(idx, torch.randn(4, 4, generator=g))
    log_z = estimate_log_z(torch.randn(3, 5, generator=g), 24)
    torch.save({"bank": bank.bank, "log_z": log_z, "agree": dist.buffers_agree(bank)}, f"{out}/rank{rank}.pt")
    # Now break it on purpose: the checker must notice.
    if rank == 1:
        bank.bank[0, 0] += 1.0
    torch.save({"agree_after_break": dist.buffers_agree(bank)}, f"{out}/broken{rank}.pt")
    leave_gloo()


def test_bank_identical_across_ranks_and_equal_to_one_process(tmp_path):
    mp.spawn(_bank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["bank"], r1["bank"])
    assert torch.equal(r0["log_z"], r1["log_z"])
    assert r0["agree"] and r1["agree"]
    assert not torch.load(tmp_path / "broken0.pt")["agree_after_break"]

    # Single-process replay of the union of both ranks' batches gives the same bank.
    from instdisc.memory import MemoryBank

    torch.manual_seed(0)
    bank = MemoryBank(24, 4, momentum=0.5)
    gens = [torch.Generator().manual_seed(100 + r) for r in (0, 1)]
    for step in range(3):
        idx = torch.cat([torch.arange(4) + 8 * step + 4 * r for r in (0, 1)])
        z = torch.cat([torch.randn(4, 4, generator=gens[r]) for r in (0, 1)])
        bank.update(idx, z)
    assert torch.allclose(bank.bank, r0["bank"], atol=1e-6)


def _stop_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import signal

    from instdisc.runtime import StopRequest

    init_gloo(rank, world, port)
    with StopRequest(0) as stop:
        seen = [stop.check()]  # no reason anywhere yet
        if rank == 1:  # a signal that reached only one rank (e.g. sent to one process)
            os.kill(os.getpid(), signal.SIGTERM)
        seen += [stop.check(), stop.reason]
    with open(f"{out}/stop{rank}.json", "w") as f:
        json.dump(seen, f)
    leave_gloo()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import json

    mp.spawn(_stop_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert json.loads((tmp_path / f"stop{r}.json").read_text()) == [False, True, "SIGTERM"], r


MONITOR_CASES = (("npid", {"nce_k": 16}), ("simclr", {"sync_bn": False}), ("simclr", {"sync_bn": False, "knn_subset": 40}))


def _monitor_numbers(rank: int, world: int) -> list:
    """The kNN monitor (bank or re-embedded train side) and the final kNN of three tiny untrained
    models; synthetic:95 has 95 train and 23 test images, so two ranks get unequal shares."""
    from instdisc.dist import Env
    from instdisc.engine import evaluate_knn, open_sets
    from instdisc.methods import resolve_config
    from instdisc.methods.build import build_method

    out = []
    for method, extra in MONITOR_CASES:
        cfg = resolve_config({"data": "synthetic:95", "arch": "resnet18", "width": 4, "knn_k": 10, "device": "cpu",
                              **extra}, {}, method)
        train, test = open_sets(cfg)
        torch.manual_seed(0)
        m = build_method(cfg, len(train))
        env = Env(rank=rank, world_size=world, local_rank=rank)
        out.append([evaluate_knn(m, train, test, cfg, env, use_bank=b) for b in (True, False)])
    return out


def _monitor_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    from instdisc.evaluate import knn_eval

    init_gloo(rank, world, port)
    scored, real = [], knn_eval.knn_scores
    knn_eval.knn_scores = lambda query, *a, **kw: scored.append(query.shape[0]) or real(query, *a, **kw)
    numbers = _monitor_numbers(rank, world)
    with open(f"{out}/monitor{rank}.json", "w") as f:
        json.dump({"numbers": numbers, "scored": scored}, f)
    leave_gloo()


def test_the_knn_monitor_shared_across_ranks_gives_the_one_process_number(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (init_gloo); put back for the tests that follow
    try:
        one = _monitor_numbers(0, 1)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_monitor_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"monitor{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["numbers"] == one and got[1]["numbers"] == one
    # Each rank scored its own share of the 23 queries (12 + 11), at every call.
    assert got[0]["scored"] == [12] * 6 and got[1]["scored"] == [11] * 6
    # The subset is a real change of the monitor's train side, not ignored (the final kNN uses all).
    assert one[2][0] != one[1][0] and one[2][1] == one[1][1]


def test_two_srun_tasks_without_torchrun_form_one_process_group(tmp_path):
    """What `srun --ntasks 2 python -m instdisc ...` gives each process: SLURM's variables only."""
    code = ("import torch; from instdisc import dist; env = dist.init_from_env('cpu'); "
            "t = torch.tensor([float(env.rank + 1)]); dist.all_reduce_(t); "
            "print(env.rank, env.world_size, env.local_rank, int(t.item())); dist.cleanup()")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(OMP_NUM_THREADS="1", SLURM_STEP_ID="0", SLURM_JOB_ID="7", SLURM_NTASKS="2",
                SLURM_STEP_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip().splitlines()[-1] for o in outs] == ["0 2 0 3", "1 2 1 3"]


def test_torchrun_two_processes_train_npid(tmp_path):
    """The same `instdisc train` command under torchrun: trains, checkpoints, banks agree (the engine
    checks every rank's buffers at each checkpoint and fails loudly otherwise)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
        "-m", "instdisc", "train", "--method", "npid", "--data", "synthetic:256", "--out", str(out),
        "--epochs", "2", "--batch-size", "32", "--arch", "resnet18", "--width", "8", "--nce-k", "64",
        "--knn-k", "10", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
        "--milestones", "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    ck = torch.load(Path(out) / "checkpoints" / "last.pt", weights_only=True)
    assert ck["state"]["epoch"] == 2 and ck["state"]["step"] == 2 * (256 // 32)
    assert "final weighted kNN" in res.stdout
