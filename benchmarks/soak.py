"""Soak test of exact resume: a tiny run SIGKILLed at random points and resumed, over and over, must
end bit-identical to the same run left alone.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/soak.py --cycles 50
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/soak.py --cycles 5 --method all   # quick check

One cycle starts `instdisc train ... --resume` (the first one without --resume), waits until its
checkpoint is 1-3 steps further on, sleeps a random 0-150 ms more (so that kills land inside steps,
inside checkpoint writes and inside log writes) and kills the process with SIGKILL. With probability
--truncate-p the newest checkpoint is then cut short, as a torn write on a file system without
atomic renames would leave it: the next resume must fall back to prev.pt. After the last cycle the
run is resumed to its end and compared, tensor by tensor, with an uninterrupted run of the same
command: weights, optimizer state, method buffers (bank, queue, labels), RNG states, sampler
position, schedule step, and the loss and batch of every logged step.

Prints one JSON line per method; exits 1 if any run differs. Every process uses one thread
(OMP_NUM_THREADS=1), so that the comparison is about resuming, not about thread scheduling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from instdisc.checkpoint import load_checkpoint
from instdisc.errors import UserError
from instdisc.methods import METHODS

N, BATCH = 64, 8


def tiny_method_flags(name: str) -> list[str]:
    """Size hyper-parameters of any method (int defaults, or int list entries, above 32) set to 16;
    GPU-only options off."""
    import dataclasses

    out: list[str] = []
    default = METHODS[name].Config()
    for f in dataclasses.fields(default):
        v, flag = getattr(default, f.name), f.name.replace("_", "-")
        if f.name == "sync_bn" and v is True:
            out.append(f"--no-{flag}")
        elif f.name == "num_classes" and v == 0:  # the supervised baseline on synthetic's 10 classes
            out += [f"--{flag}", "10"]
        elif v is None and f.metadata.get("auto"):  # chosen for N when unset: set, as before
            out += [f"--{flag}", "16"]
        elif isinstance(v, int) and not isinstance(v, bool) and v > 32:
            out += [f"--{flag}", "16"]
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            if any(x > 32 for x in v):
                out += [f"--{flag}", *(str(min(x, 16)) for x in v)]
    return out


def command(run: Path, method: str, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "instdisc", "train", "--method", method, "--out", str(run), "--data", f"synthetic:{N}",
        "--arch", "resnet18", "--width", "8", "--batch-size", str(BATCH), "--epochs", str(epochs),
        "--milestones", str(max(epochs // 2, 1)), "--no-progress", "--device", "cpu", "--knn-every", "0",
        "--knn-k", "5", "--log-every", "1", "--ckpt-every-steps", "1", *tiny_method_flags(method), *extra,
    ]


def checkpoint_step(run: Path) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(load_checkpoint(run)["state"]["step"])
    except UserError:
        return 0


def differences(a, b, path: str = "") -> list[str]:
    """Paths at which two nested checkpoints differ (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return [path]
        if a.is_floating_point():
            same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        else:
            same = torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and math.isnan(a):
        return [] if isinstance(b, float) and math.isnan(b) else [path]
    return [] if a == b else [path]


def step_records(run: Path) -> list[tuple]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("batch")) for r in recs if r["type"] == "step"]


def final_state(run: Path) -> dict:
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ck["config"]["run"].pop("out")
    return ck


def soak(method: str, cycles: int, rng: random.Random, root: Path, truncate_p: float, env: dict) -> dict:
    epochs = math.ceil((8 * cycles + 8) / (N // BATCH))  # room for every cycle to move on 1-3 steps (+ overshoot)
    total = epochs * (N // BATCH)
    ref, run = root / f"{method}-reference", root / f"{method}-killed"
    t0 = time.perf_counter()
    subprocess.run(command(ref, method, epochs), env=env, check=True, stdout=subprocess.DEVNULL)
    t_ref = time.perf_counter() - t0

    kills = fallbacks = 0
    log = open(root / f"{method}-killed.log", "w")
    t0 = time.perf_counter()
    for cycle in range(cycles):
        start = checkpoint_step(run)
        if start >= total - 3:
            break  # the run is nearly done: no room left for another kill
        target = start + rng.randint(1, 3)
        extra = ("--resume",) if cycle else ()
        proc = subprocess.Popen(command(run, method, epochs, *extra), env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while checkpoint_step(run) < target:
            if proc.poll() is not None:
                raise SystemExit(f"cycle {cycle}: the run exited ({proc.returncode}) before it was killed; "
                                 f"see {log.name}")
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"cycle {cycle}: no progress in 300 s; see {log.name}")
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        last, prev = run / "checkpoints" / "last.pt", run / "checkpoints" / "prev.pt"
        if rng.random() < truncate_p and last.exists() and prev.exists():
            # A torn write damages the file that was being written, a new inode. Writing in place
            # would also damage prev.pt whenever the kill fell between the writer's hard link
            # (prev.pt -> the same inode as last.pt) and its rename of the new file over last.pt.
            torn = last.with_name("torn.tmp")
            torn.write_bytes(last.read_bytes()[: int(last.stat().st_size * rng.uniform(0.0, 0.95))])
            os.replace(torn, last)
            fallbacks += 1
    subprocess.run(command(run, method, epochs, "--resume"), env=env, check=True, stdout=log, stderr=log)
    t_kill = time.perf_counter() - t0
    log.close()

    diffs = differences(final_state(ref), final_state(run))
    same_steps = step_records(ref) == step_records(run)
    return {
        "method": method, "cycles": kills, "truncated_checkpoints": fallbacks, "steps": total,
        "identical": not diffs and same_steps, "differences": diffs[:10], "same_step_log": same_steps,
        "reference_s": round(t_ref, 1), "killed_and_resumed_s": round(t_kill, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=50, help="kill/resume cycles per method (default 50)")
    p.add_argument("--method", default="npid", choices=[*METHODS, "all"])
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--truncate-p", type=float, default=0.1, help="chance of truncating last.pt after a kill")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder, deleted)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="instdisc-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        for m in list(METHODS) if args.method == "all" else [args.method]:
            shutil.rmtree(root / f"{m}-reference", ignore_errors=True)
            shutil.rmtree(root / f"{m}-killed", ignore_errors=True)
            res = soak(m, args.cycles, random.Random(f"{args.seed}-{m}"), root, args.truncate_p, env)
            print(json.dumps(res), flush=True)
            ok = ok and res["identical"]
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
