"""Reliability: killed runs resume exactly, checkpoints survive crashes, NaNs stop or skip cleanly,
bad input is a one-paragraph error, and a dead or stalled rank stops a distributed run.

Every run here is tiny (synthetic:64, width-8 ResNet-18, 8 steps) so that real subprocesses can be
SIGKILLed at random points in a few seconds. Runs compared bit for bit use one thread, in
subprocesses (OMP_NUM_THREADS=1) and in this process (torch.set_num_threads(1)) alike.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from instdisc import checkpoint as ckpt_mod
from instdisc import engine, rundir
from instdisc.checkpoint import load_checkpoint, save_checkpoint
from instdisc.cli import main
from instdisc.config import TrainConfig, load_preset
from instdisc.errors import CheckpointError, ConfigError, DataError, InstdiscWarning, UserError
from instdisc.loader import make_order
from instdisc.methods import METHODS, config_from_dict, resolve_config

N, BATCH, EPOCHS = 64, 16, 2
STEPS = N // BATCH * EPOCHS  # 8
BASE = ["--data", f"synthetic:{N}", "--arch", "resnet18", "--width", "8", "--batch-size", str(BATCH),
        "--epochs", str(EPOCHS), "--milestones", "1", "--no-progress", "--device", "cpu", "--knn-every", "0",
        "--knn-k", "5", "--log-every", "1", "--ckpt-every-steps", "1"]
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def tiny_method_values(name: str) -> dict:
    """Small values for a method's own size hyper-parameters, whatever they are called: every int
    field (or int list entry) whose default is above 32 (embedding size, negatives, queue length,
    clusters, iteration caps), or left to be chosen for N, becomes 16, and GPU-only options are switched off. Methods added later
    are covered without edits here."""
    values: dict = {}
    default = METHODS[name].Config()
    for f in dataclasses.fields(default):
        v = getattr(default, f.name)
        if f.name == "sync_bn" and v is True:
            values[f.name] = False
        elif f.name == "num_classes" and v == 0:  # the supervised baseline on synthetic's 10 classes
            values[f.name] = 10
        elif v is None and f.metadata.get("auto"):  # chosen for N when unset: set, so the sized path runs
            values[f.name] = [16] if "list" in str(f.type) else 16
        elif isinstance(v, int) and not isinstance(v, bool) and v > 32:
            values[f.name] = 16
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            if any(x > 32 for x in v):
                values[f.name] = [min(x, 16) for x in v]
    return values


def all_cases() -> dict[str, tuple[str, dict]]:
    """Case id -> (method, its tiny values): every method, plus a run with its queue switched on
    where a queue is off by default (PIC's negative-sampling queue, with its sparse optimizer)."""
    out = {}
    for m in METHODS:
        base = tiny_method_values(m)
        out[m] = (m, base)
        default = METHODS[m].Config()
        for f in dataclasses.fields(default):
            v = getattr(default, f.name)
            if "queue" in f.name and type(v) is int and v == 0:
                out[f"{m}+{f.name}"] = (m, {**base, f.name: 16})
    return out


CASES = all_cases()


def case_flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = k.replace("_", "-")
        out += [f"--no-{flag}"] if v is False else [f"--{flag}", *map(str, v if isinstance(v, list) else [v])]
    return out


def train_args(out: Path, case: str, *extra: str) -> list[str]:
    method, values = CASES[case]
    return ["train", "--method", method, "--out", str(out), *BASE, *case_flags(values), *extra]


def train(out: Path, method: str = "npid", *extra: str) -> int:
    return main(train_args(out, method, *extra))


_REFERENCES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory):
    return tmp_path_factory.mktemp("references")


def reference(method: str, root: Path) -> Path:
    """An uninterrupted run (computed once per method; the caller holds one_thread)."""
    if method not in _REFERENCES:
        out = root / method
        assert train(out, method) == 0
        _REFERENCES[method] = out
    return _REFERENCES[method]


def assert_identical(a, b, path: str = "checkpoint") -> None:
    """Bit-identical nested checkpoints (NaN equal to NaN, e.g. an unset Z)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def final_checkpoint(run: Path) -> dict:
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ck["config"]["run"].pop("out")
    return ck


def step_records(run: Path) -> list[tuple]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["type"], r["loss"], r.get("batch")) for r in recs if r["type"] in ("step", "skip")]


def assert_same_run(ref: Path, run: Path) -> None:
    """Weights, optimizer, method buffers (bank, queue, labels), RNG states, sampler position and
    schedule step of the final checkpoints, and the loss and batch of every step, all equal."""
    a, b = final_checkpoint(ref), final_checkpoint(run)
    assert a["state"]["step"] == STEPS
    assert_identical(a, b)
    assert step_records(ref) == step_records(run)
    assert len(step_records(ref)) == STEPS


def wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def logged_steps(run: Path) -> int:
    p = run / "metrics.jsonl"
    return p.read_text().count('"type": "step"') if p.exists() else 0


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# 1. exact resume after SIGKILL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CASES))
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, ref_root, method, one_thread):
    ref = reference(method, ref_root)
    run = tmp_path / "run"
    rng = random.Random(f"sigkill-{method}")
    k, delay = rng.randint(2, STEPS - 3), rng.uniform(0.0, 0.05)  # kill after step k, anywhere in step k+1
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "instdisc", *train_args(run, method)], env=SUB_ENV,
                                stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: logged_steps(run) >= k, proc, f"step {k}")
        time.sleep(delay)
        sigkill(proc)
    ck = load_checkpoint(run)  # whatever instant the kill hit, a complete checkpoint is there
    assert 1 <= ck["state"]["step"] < STEPS
    assert train(run, method, "--resume") == 0
    assert_same_run(ref, run)


@pytest.mark.parametrize("loader", [[], ["--no-in-memory", "--workers", "1"]], ids=["in-memory", "workers"])
def test_sigterm_finishes_the_step_checkpoints_and_resume_is_bit_identical(tmp_path, ref_root, loader, one_thread):
    # A scheduler's pre-emption: SIGTERM (to the whole process group, DataLoader workers included),
    # then SIGKILL after a grace period. No step checkpoints here (--ckpt-every-steps 0), so the
    # checkpoint at the stop is the one written for the signal.
    ref = reference("npid", ref_root)
    run = tmp_path / "run"
    args = train_args(run, "npid", "--ckpt-every-steps", "0", *loader)
    with open(tmp_path / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "instdisc", *args], env=SUB_ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: logged_steps(run) >= 2, proc, "step 2")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    printed = (tmp_path / "stdout.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, printed  # not 0: the run is not finished
    step = load_checkpoint(run)["state"]["step"]
    assert 2 <= step < STEPS and step == logged_steps(run)  # stopped after the step under way
    assert "SIGTERM received" in printed and f"--out {run} --resume" in printed
    assert train(run, "npid", "--resume", "--ckpt-every-steps", "1", "--in-memory") == 0
    assert_same_run(ref, run)


def test_sigusr1_checkpoints_exits_138_and_the_same_command_continues_bit_identically(tmp_path, ref_root, one_thread):
    # SLURM's `--signal=USR1@90` (the job's time is nearly up) reaches every process of the step,
    # DataLoader workers included. The launch and the requeued one are the same command line
    # (--resume auto); the status is the one docs/slurm.md's requeue script tests.
    ref = reference("npid", ref_root)
    run = tmp_path / "run"
    args = train_args(run, "npid", "--ckpt-every-steps", "0", "--no-in-memory", "--workers", "1", "--resume", "auto")
    with open(tmp_path / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "instdisc", *args], env=SUB_ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: logged_steps(run) >= 2, proc, "step 2")
        os.killpg(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=60)
    printed = (tmp_path / "stdout.txt").read_text()
    assert proc.returncode == 128 + signal.SIGUSR1 == 138, printed
    step = load_checkpoint(run)["state"]["step"]
    assert 2 <= step < STEPS and step == logged_steps(run) and "SIGUSR1 received" in printed
    assert main(args) == 0
    a, b = final_checkpoint(ref), final_checkpoint(run)
    for ck in (a, b):  # how the images were read and how often saved: not the maths
        ck["config"]["run"].pop("ckpt_every_steps")
        ck["config"]["data"].pop("workers"), ck["config"]["data"].pop("in_memory")
    assert a["state"]["step"] == STEPS
    assert_identical(a, b)
    assert step_records(ref) == step_records(run)


def large_image_folder(root: Path) -> Path:
    """An ImageFolder of 24 large JPEGs (3:4, 4:3 and 1:3; above the in-memory limit, so streamed
    and cropped at decode time), and 8 for the test split."""
    rng = np.random.default_rng(0)
    shapes = [(90, 120), (120, 90), (60, 180)]
    for split, n in (("train", 24), ("val", 8)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                h, w = shapes[i % 3]
                a = np.clip(rng.normal(128, 60, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i:02d}.jpg", quality=90)
    return root


@pytest.mark.parametrize("method", ["npid", "pic"])
def test_large_images_sigkill_then_resume_is_bit_identical(tmp_path, method, one_thread):
    # The decode-time crop path (DataLoader workers, crops per (seed, step, rank)); PIC's four
    # crops per image are all drawn there. Same SIGKILL + --resume as above, on 24 large JPEGs.
    data = large_image_folder(tmp_path / "data")
    _, values = CASES[method]
    common = ["--data", str(data), "--aug-size", "32", "--batch-size", "6", "--workers", "1"]

    def args(out: Path) -> list[str]:
        return [*train_args(out, method), *case_flags(values), *common]

    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    assert final_checkpoint(ref)["config"]["data"]["data"] == str(data)
    run = tmp_path / "run"
    rng = random.Random(f"large-{method}")
    k, delay = rng.randint(2, STEPS - 3), rng.uniform(0.0, 0.05)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "instdisc", *args(run)], env=SUB_ENV,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        wait_for(lambda: logged_steps(run) >= k, proc, f"step {k}")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the DataLoader worker too
        proc.wait(timeout=30)
    assert 1 <= load_checkpoint(run)["state"]["step"] < STEPS
    assert main([*args(run), "--resume"]) == 0
    assert_same_run(ref, run)


def test_stop_request_handles_the_first_signal_and_passes_on_the_second():
    from instdisc.runtime import StopRequest

    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        stop = StopRequest(0)
        assert stop.check() is False and not stop.expired
        with stop:
            os.kill(os.getpid(), signal.SIGINT)  # handled: only recorded
            assert seen == [] and stop.check() and stop.reason == "SIGINT" and stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the second goes to the previous handler at once
            assert seen == [signal.SIGINT]
        unused = StopRequest(0)
        with unused:
            pass
        assert signal.getsignal(signal.SIGINT) is not unused._on_signal  # handlers restored on exit
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT, signal.SIGINT] and unused.check() is False
    finally:
        signal.signal(signal.SIGINT, previous)


def test_global_random_generators_and_data_order_continue_across_resume(tmp_path, monkeypatch):
    """Draws outside the steps (here: an epoch-start hook using torch, numpy and Python's global
    generators) continue after a resume exactly as without one; a changed data order is reported."""
    draws: list = []
    npid = METHODS["npid"]

    def on_epoch_start(self, ctx):
        draws.append((ctx.epoch, torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()))
        return {}

    monkeypatch.setattr(npid, "on_epoch_start", on_epoch_start)
    assert train(tmp_path / "full") == 0
    full, draws[:] = list(draws), []
    part = tmp_path / "part"
    assert train(part, "npid", "--max-steps", str(STEPS // EPOCHS)) == 0  # stops at the epoch boundary
    assert train(part, "npid", "--resume") == 0
    assert [d[0] for d in full] == [0, 1] and draws == full
    assert load_checkpoint(part)["sampler"] == {"epoch": EPOCHS, "position": 0,
                                                "order_crc32": rundir.order_fingerprint(make_order(
                                                    "shuffle", N, seed=0, batch_size=BATCH)(EPOCHS))}

    def other_order(ck):
        ck["sampler"]["order_crc32"] ^= 1

    run = tmp_path / "run"
    assert train(run, "npid", "--max-steps", "3") == 0
    _tamper(run, other_order)
    with pytest.warns(InstdiscWarning, match="data order"):
        assert train(run, "npid", "--resume") == 0


# ---------------------------------------------------------------------------------------------
# 2. atomic checkpoints
# ---------------------------------------------------------------------------------------------

HANG_IN_SAVE = """
import io, os, sys, time
import torch
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] < int(os.environ["HANG_AT"]):
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half of the new checkpoint is on disk
    f.flush()
    open(os.environ["MARKER"], "w").close()
    time.sleep(600)
torch.save = save
from instdisc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_mid_write_keeps_the_previous_checkpoints(tmp_path, ref_root, one_thread):
    script, marker, run = tmp_path / "hang.py", tmp_path / "writing", tmp_path / "run"
    script.write_text(HANG_IN_SAVE)
    env = {**SUB_ENV, "HANG_AT": "4", "MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(script), *train_args(run, "npid")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker.exists, proc, "the 4th checkpoint write")
    sigkill(proc)
    d = run / "checkpoints"
    partial = list(d.glob(".last.pt.tmp.*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the torn write is there...
    assert load_checkpoint(d / "last.pt")["state"]["step"] == 3  # ...but last.pt is the 3rd, intact
    assert load_checkpoint(d / "prev.pt")["state"]["step"] == 2
    assert train(run, "npid", "--resume") == 0
    assert not list(d.glob(".last.pt.tmp.*"))  # the torn temporary is cleaned up
    assert_same_run(reference("npid", ref_root), run)


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, ref_root, one_thread):
    run = tmp_path / "run"
    assert train(run, "npid", "--max-steps", "5") == 0
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with pytest.warns(InstdiscWarning, match="unreadable"):
        assert load_checkpoint(run)["state"]["step"] == 4
    with pytest.warns(InstdiscWarning, match="previous checkpoint"):
        assert train(run, "npid", "--resume") == 0
    assert (run / "checkpoints" / "last.pt.damaged").exists()  # kept aside, not rotated into prev.pt
    assert_same_run(reference("npid", ref_root), run)


def test_checkpoint_writer_rotates_cleans_and_survives_failures(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    for i in range(3):
        save_checkpoint(tmp_path, {"config": {}, "model": {"w": torch.full((3,), float(i))}})
    assert load_checkpoint(d / "last.pt")["model"]["w"][0] == 2 and load_checkpoint(d / "prev.pt")["model"]["w"][0] == 1
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "prev.pt"]  # no temporaries left behind

    (d / ".last.pt.tmp.999999999").write_bytes(b"PK\x03\x04half")  # a writer killed mid-save...
    os.link(d / "last.pt", d / ".prev.pt.link.999999999")  # ...or mid-rotation
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*untouched"):
        save_checkpoint(tmp_path, {"config": {}, "model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(d / "last.pt")["model"]["w"][0] == 2 and load_checkpoint(d / "prev.pt")["model"]["w"][0] == 1
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "prev.pt"]  # stale and failed temporaries gone

    # Without hard links the rotation is a rename; a crash between the two renames leaves prev.pt only.
    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_mod.os, "link", no_links)
    save_checkpoint(tmp_path, {"config": {}, "model": {"w": torch.full((3,), 3.0)}})
    assert load_checkpoint(d / "prev.pt")["model"]["w"][0] == 2
    (d / "last.pt").unlink()
    assert load_checkpoint(tmp_path)["model"]["w"][0] == 2


CHECKPOINT_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@CHECKPOINT_FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_corrupted_checkpoint_is_a_checkpoint_error(tmp_path_factory, flips, cut):
    d = tmp_path_factory.mktemp("fuzz")
    save_checkpoint(d, {"config": {"run": {"method": "npid"}}, "model": {"w": torch.arange(50.0)}})
    p = d / "checkpoints" / "last.pt"
    data = bytearray(p.read_bytes())
    for pos, x in flips:
        data[int(pos * len(data))] ^= x
    if cut is not None:
        data = data[: int(cut * len(data))]
    p.write_bytes(bytes(data))
    try:
        ck = load_checkpoint(p)
    except CheckpointError:
        return
    assert isinstance(ck, dict) and "model" in ck  # damage the format cannot see (inside tensor bytes)


# ---------------------------------------------------------------------------------------------
# 3. non-finite loss or gradient
# ---------------------------------------------------------------------------------------------


def batch_at(step: int, seed: int = 0) -> torch.Tensor:
    """Dataset indices of the 1-based global `step` of a single-process run."""
    spe = N // BATCH
    order = make_order("shuffle", N, seed=seed, batch_size=BATCH)((step - 1) // spe)
    s = (step - 1) % spe
    return order[s * BATCH : (s + 1) * BATCH]


def poison(monkeypatch, method: str, steps: list[int], *, grad_of_last_param: bool = False) -> dict:
    """Make the given steps non-finite: NaN inputs (so the method's forward also writes NaN into its
    buffers), or a NaN gradient for one parameter only. Keyed on the batch, so it survives resume.
    Records the method's state and optimizer state before each forward."""
    cls = METHODS[CASES[method][0]]
    bad = [batch_at(s) for s in steps]
    seen: dict = {"before": [], "optimizers": []}
    forward, configure = cls.forward, cls.configure_optimizer

    def snapshot(m):
        opt = seen["optimizers"][-1]
        return {"model": {k: v.clone() for k, v in m.state_dict().items()},
                "optimizer": torch.load(_roundtrip(opt.state_dict()), weights_only=True)}

    def patched_forward(self, views, idx):
        seen["before"].append((idx.clone(), snapshot(self)))
        if any(torch.equal(idx, b) for b in bad):
            if grad_of_last_param:
                name, p = [(n, p) for n, p in self.named_parameters() if p.requires_grad][-1]
                seen["param"] = name
                p.register_hook(lambda g: g * float("nan"))
            else:
                views = [v * float("nan") for v in views]
        return forward(self, views, idx)

    def patched_configure(self, *a, **k):
        opt = configure(self, *a, **k)
        seen["optimizers"].append(opt)
        return opt

    monkeypatch.setattr(cls, "forward", patched_forward)
    monkeypatch.setattr(cls, "configure_optimizer", patched_configure)
    return seen


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_nonfinite_loss_stops_naming_the_step_with_a_debug_snapshot(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    poison(monkeypatch, "npid", [6])
    assert train(run) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 6 (epoch 2, batch 2 of the epoch)" in err and "Traceback" not in err
    assert "--skip-nonfinite" in err
    snap = torch.load(run / "debug" / "step00000006-rank0.pt", weights_only=True)
    assert torch.equal(snap["idx"], batch_at(6)) and snap["step"] == 6 and snap["loss"] != snap["loss"]
    assert "memory.bank" in snap["model"] and snap["config"]["run"]["method"] == "npid"
    assert load_checkpoint(run)["state"]["step"] == 5  # the last good state, ready for --resume


def test_nonfinite_gradient_names_the_parameter(tmp_path, monkeypatch, capsys):
    seen = poison(monkeypatch, "npid", [3], grad_of_last_param=True)
    assert train(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"the gradient of {seen['param']} became nan at step 3" in err


@pytest.mark.parametrize("method", list(CASES))
def test_skip_nonfinite_leaves_no_trace_and_resumes_exactly(tmp_path, monkeypatch, capsys, method, one_thread):
    seen = poison(monkeypatch, method, [3])
    full = tmp_path / "full"
    assert train(full, method, "--skip-nonfinite", "2") == 0
    assert "instdisc: warning: skipped step 3" in capsys.readouterr().err
    # The state before step 3's forward equals the state before step 4's: the NaN step changed
    # neither the weights, nor the optimizer, nor the buffers its forward wrote (bank, queue, ...).
    (i3, before3), (i4, before4) = seen["before"][2], seen["before"][3]
    assert torch.equal(i3, batch_at(3)) and torch.equal(i4, batch_at(4))
    assert_identical(before3, before4)
    ck = final_checkpoint(full)
    assert ck["state"]["skipped"] == 1 and ck["state"]["step"] == STEPS
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r[:2] for r in step_records(full) if r[1] == "skip"] == [(3, "skip")]
    assert (full / "debug" / "step00000003-rank0.pt").exists()

    # Stopped right after the skipped step, then resumed: the same run.
    part = tmp_path / "part"
    assert train(part, method, "--skip-nonfinite", "2", "--max-steps", "3") == 0
    assert train(part, method, "--resume") == 0
    assert_identical(final_checkpoint(full), final_checkpoint(part))
    assert step_records(full) == step_records(part)


def test_skip_budget_is_shared_across_resume(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "npid", [2, 7])
    run = tmp_path / "run"
    assert train(run, "npid", "--skip-nonfinite", "1", "--max-steps", "4") == 0
    assert load_checkpoint(run)["state"]["skipped"] == 1
    assert train(run, "npid", "--resume") == 2
    err = capsys.readouterr().err
    assert "at step 7" in err and "allowed 1 skipped step(s) and all were used" in err


# ---------------------------------------------------------------------------------------------
# 4. bad input: one paragraph, exit code 2, no traceback; the last good checkpoint survives
# ---------------------------------------------------------------------------------------------


def _img(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, size: int) -> Path:
    for split in ("train", "test"):
        for c in "ab":
            for i in range(4):
                _img(root / split / c / f"{i}.png", size, hash((split, c, i)) % 1000)
    return root


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty_dir(t: Path) -> list[str]:
    (t / "empty").mkdir()
    return ["--data", str(t / "empty")]


def _empty_class(t: Path) -> list[str]:
    root = _folder(t / "ds", 16)
    (root / "train" / "zzz").mkdir()
    return ["--data", str(root)]


def _not_an_archive(t: Path) -> list[str]:
    (t / "images.tar").write_bytes(b"certainly not a tar file" * 40)
    return ["--data", str(t / "images.tar")]


def _truncated_small(t: Path) -> list[str]:
    root = _folder(t / "ds", 16)
    _truncate(root / "train" / "b" / "2.png")
    return ["--data", str(root)]


def _truncated_streamed(t: Path) -> list[str]:
    # Large images are only listed when opened; the bad one is found by a DataLoader worker mid-run.
    root = _folder(t / "ds", 80)
    _truncate(root / "train" / "b" / "2.png")
    return ["--data", str(root), "--batch-size", "4", "--image-size", "32", "--workers", "1", "--nce-k", "4"]


def _out_is_a_file(t: Path) -> list[str]:
    (t / "file").write_text("")
    return ["--out", str(t / "file" / "run")]


@pytest.mark.parametrize("setup,needle", [
    (_empty_dir, "is empty"),
    (_empty_class, "zzz"),
    (_not_an_archive, "images.tar"),
    (_truncated_small, "2.png"),
    (_truncated_streamed, "2.png) cannot be decoded: truncated"),
    (_out_is_a_file, "cannot write to the run directory"),
    (lambda t: ["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0"),
    (lambda t: ["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    (lambda t: ["--ckpt-every-steps", "-2"], "--ckpt-every-steps must be >= 0"),
    (lambda t: ["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (lambda t: ["--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, capsys, setup, needle):
    argv = train_args(tmp_path / "run", "npid") + setup(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("instdisc: error:") and needle in err, err
    assert "Traceback" not in err and "Caught" not in err and err.count("\n") == 1


def test_bad_dist_timeout_in_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INSTDISC_DIST_TIMEOUT", "soon")
    assert train(tmp_path / "run") == 2
    assert "INSTDISC_DIST_TIMEOUT must be a positive number" in capsys.readouterr().err


def _tamper(run: Path, edit) -> None:
    p = run / "checkpoints" / "last.pt"
    ck = torch.load(p, weights_only=True)
    edit(ck)
    torch.save(ck, p)
    (run / "checkpoints" / "prev.pt").unlink(missing_ok=True)


def test_checkpoints_of_other_runs_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "npid", "--epochs", "1") == 0
    capsys.readouterr()
    # Another architecture or another method on the command line: refused before anything runs.
    assert train(run, "npid", "--epochs", "1", "--width", "16", "--resume") == 2
    assert "width was 8 in this run; it cannot change to 16" in capsys.readouterr().err
    others = [m for m in METHODS if m != "npid"]
    if others:
        assert main(train_args(run, others[0], "--epochs", "1", "--resume")) == 2
        assert "cannot change" in capsys.readouterr().err
    # A checkpoint whose content is another method's, another training set's, another model's.
    _tamper(run, lambda ck: ck.update(method="pic"))
    assert train(run, "npid", "--epochs", "1", "--resume") == 2
    assert "is a 'pic' run, not 'npid'" in capsys.readouterr().err
    _tamper(run, lambda ck: ck.update(method="npid", num_samples=50_000))
    assert train(run, "npid", "--epochs", "1", "--resume") == 2
    assert "the training set changed" in capsys.readouterr().err
    _tamper(run, lambda ck: ck["config"]["model"].update(width=16))
    assert main(["embed", str(run), "--out", str(tmp_path / "f.npy")]) == 2
    assert "does not match its own config" in capsys.readouterr().err
    # Files that are not instdisc checkpoints at all.
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    for f, needle in [("plain.pt", "is not an instdisc checkpoint"), ("garbage.pt", "is unreadable")]:
        assert main(["embed", str(tmp_path / f), "--out", str(tmp_path / "f.npy")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("raised", ["OSError", "RuntimeError"])
def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, raised):
    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] < 4:
            return real_save(obj, f, *a, **k)
        f.write(b"PK\x03\x04" + b"\0" * 1000)  # part of it fitted on the disk
        if raised == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what torch 2.x really raises after the ENOSPC (its stream writer drops the errno)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    run = tmp_path / "run"
    assert train(run) == 2
    err = capsys.readouterr().err
    assert ("No space left on device" in err if raised == "OSError" else "the write failed (torch: " in err)
    assert "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    d = run / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "prev.pt"]
    assert load_checkpoint(d / "last.pt")["state"]["step"] == 3 and load_checkpoint(d / "prev.pt")["state"]["step"] == 2


def _mount_tmpfs(where: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes at `where`; None on success, else why it cannot be done."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root on Linux to mount a small tmpfs"
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else f"mount -t tmpfs refused: {res.stderr.strip()}"


def test_a_really_full_file_system_while_checkpointing(tmp_path, capsys):
    """A real ENOSPC (torch turns it into a RuntimeError): exit 2, one paragraph, the last good
    checkpoint intact, no temporary left. The file system holds about 1.5 checkpoints, so the
    second save (new file next to the old one) runs out of space."""
    probe = tmp_path / "probe"
    assert train(probe, "npid", "--max-steps", "1") == 0
    size = (probe / "checkpoints" / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, size * 3 // 2 + 256 * 1024)
    if why:
        pytest.skip(why)
    try:
        capsys.readouterr()
        assert train(disk / "run") == 2
        err = capsys.readouterr().err
        assert "could not write a checkpoint" in err and "no space left" in err and "Traceback" not in err
        d = disk / "run" / "checkpoints"
        assert sorted(p.name for p in d.iterdir()) in (["last.pt"], ["last.pt", "prev.pt"])
        assert load_checkpoint(d / "last.pt")["state"]["step"] >= 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_while_logging_and_exporting(tmp_path, monkeypatch, capsys):
    real_open, calls = open, [0]

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls[0] += 1
            if calls[0] >= 3:  # the log line of step 3
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    run = tmp_path / "run"
    assert train(run) == 2
    assert "could not append to" in capsys.readouterr().err
    assert load_checkpoint(run)["state"]["step"] == 2
    monkeypatch.undo()

    # Any other full-disk error (here: writing exported features) is a message too, not a traceback.
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f.npy"))

    monkeypatch.setattr("instdisc.features.save_features", no_space)
    assert main(["embed", str(run), "--out", str(tmp_path / "f.npy")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("instdisc: error: No space left on device") and "Traceback" not in err


_YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
CONFIG_FUZZ = settings(max_examples=150, deadline=None)


def _known_keys(method: str) -> list[str]:
    from instdisc.config import _all_keys

    return sorted(_all_keys(METHODS[method].Config))


@CONFIG_FUZZ
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
def test_fuzz_config_values_give_a_config_or_a_config_error(data, method):
    keys = _known_keys(method) + ["nce_kk", "lr_", "bogus"]
    preset = data.draw(st.dictionaries(st.sampled_from(keys), _YAML_VALUES, max_size=5))
    try:
        cfg = resolve_config(preset, {}, method)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, TrainConfig)
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


@CONFIG_FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("abcdefgkmnprstuvw_-:[]{},.'\"#!&*|>0123456789 \n\t")), max_size=60))
def test_fuzz_config_files_give_a_config_or_a_config_error(tmp_path_factory, text):
    p = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    p.write_text(text)
    try:
        cfg = resolve_config(load_preset(p), {}, "npid")
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, TrainConfig)


# ---------------------------------------------------------------------------------------------
# 5. refusing to overwrite (the refusal itself: test_cli.py::test_refuses_to_overwrite_...)
# ---------------------------------------------------------------------------------------------


def test_resume_needs_a_run_and_overwrite_starts_clean(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "npid", "--resume") == 2
    assert "there is no run or checkpoint there" in capsys.readouterr().err
    assert train(run, "npid", "--max-steps", "3") == 0
    (run / "debug").mkdir()
    (run / "debug" / "step00000002-rank0.pt").write_bytes(b"x")
    assert train(run, "npid", "--max-steps", "2") == 2  # refused: the run is kept
    assert load_checkpoint(run)["state"]["step"] == 3
    assert train(run, "npid", "--max-steps", "2", "--overwrite") == 0
    assert load_checkpoint(run / "checkpoints" / "prev.pt")["state"]["step"] == 1  # nothing of the old run
    assert not list((run / "debug").iterdir())
    assert [r[0] for r in step_records(run)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 6. distributed: identical state across ranks, and no hang when a rank dies or stalls
# ---------------------------------------------------------------------------------------------

pytest_dist = pytest.mark.dist

TWO_RANKS_TRAIN_AND_RESUME = """
import json, sys
import torch
from instdisc import dist, engine
from instdisc.methods import resolve_config
from instdisc.methods import build as building

built = []  # every method fit builds, fresh or resumed (both go through methods.build.build_method)
build = building.build_method
building.build_method = lambda cfg, n: built.append(build(cfg, n)) or built[-1]
env = dist.init_from_env("cpu", timeout_s=120)
root, cases, common = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for case, (method, own) in cases.items():
    preset = {**common, **own, "out": f"{root}/{case}"}
    engine.fit(resolve_config({**preset, "max_steps": 3}, {}, method), env)
    torch.save(built[-1].state_dict(), f"{root}/{case}-partial-rank{env.rank}.pt")
    engine.fit(resolve_config(preset, {}, method), env, resume=True)
    torch.save(built[-1].state_dict(), f"{root}/{case}-final-rank{env.rank}.pt")
dist.cleanup()
"""

FAULTY_RANK = """
import os, sys, time
from instdisc.loader import TrainLoader
epoch = TrainLoader.epoch
def faulty(self, e, start_step=0, first_step=None):
    for i, batch in enumerate(epoch(self, e, start_step, first_step)):
        if self.rank == 1 and (e, i) == (0, 2):
            open(os.environ["MARKER"], "w").close()
            if os.environ["FAULT"] == "die":
                os._exit(3)
            time.sleep(600)
        yield batch
TrainLoader.epoch = faulty
from instdisc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch_two(cmd: list[str], tmp_path: Path, env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        e = {**SUB_ENV, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(tmp_path / f"out{rank}.txt", "w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT))
    return procs


def keeps_state(case: str) -> bool:
    """Whether a method has state of its own beyond weights and BatchNorm statistics (a bank, a
    queue, labels, a key encoder): the state that explicit collectives must keep equal on all ranks."""
    method, values = CASES[case]
    cfg = resolve_config({"arch": "resnet18", "width": 8, **values}, {}, method)
    m = engine.build_method(cfg, N)
    bn = {id(b) for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._NormBase) for b in mod.buffers()}
    frozen = [p for p in m.parameters() if not p.requires_grad]
    return bool(frozen) or any(id(b) not in bn for b in m.buffers())


@pytest_dist
def test_two_ranks_hold_identical_state_after_training_and_after_resume(tmp_path):
    """Every stateful method's buffers (NPID's bank, MoCo's queue, PIC's queue, SeLa's labels, ...) and
    weights are bit-identical on both ranks after a run stopped mid-epoch and after its resume."""
    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS_TRAIN_AND_RESUME)
    common = {"data": f"synthetic:{N}", "arch": "resnet18", "width": 8, "batch_size": BATCH, "epochs": EPOCHS,
              "milestones": [1], "progress": False, "device": "cpu", "knn_every": 0, "knn_k": 5, "log_every": 1}
    cases = {c: CASES[c] for c in CASES if keeps_state(c)}
    assert "npid" in cases and "simclr" not in cases
    procs = _launch_two([sys.executable, str(script), str(tmp_path), json.dumps(cases), json.dumps(common)], tmp_path)
    for p in procs:
        p.wait(timeout=300)
    logs = "".join((tmp_path / f"out{r}.txt").read_text()[-3000:] for r in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], logs
    for m in cases:
        for when in ("partial", "final"):
            r0, r1 = (torch.load(tmp_path / f"{m}-{when}-rank{r}.pt", weights_only=True) for r in (0, 1))
            assert_identical(r0, r1, f"{m} {when}")
        ck = torch.load(tmp_path / m / "checkpoints" / "last.pt", weights_only=True)
        assert ck["state"]["step"] == STEPS and len(ck["rng"]) == 2
        assert_identical(ck["model"], torch.load(tmp_path / f"{m}-final-rank0.pt", weights_only=True), m)


@pytest_dist
@pytest.mark.parametrize("fault,timeout", [("die", 60), ("stall", 8)])
def test_a_dead_or_stalled_rank_stops_the_others(tmp_path, fault, timeout):
    script, marker, run = tmp_path / "faulty.py", tmp_path / "fault", tmp_path / "run"
    script.write_text(FAULTY_RANK)
    cmd = [sys.executable, str(script), *train_args(run, "npid", "--dist-timeout", str(timeout))]
    procs = _launch_two(cmd, tmp_path, {"FAULT": fault, "MARKER": str(marker)})
    try:
        wait_for(marker.exists, procs[1], "rank 1's fault")
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = (tmp_path / "out0.txt").read_text()
    assert rc == 2, out[-3000:]
    assert "another process of this distributed run failed or stopped responding" in out
    assert "Traceback" not in out
    assert elapsed < timeout + 30, elapsed  # bounded by the collective timeout, not the default 10 min
    assert load_checkpoint(run)["state"]["step"] == 2  # the steps before the fault were checkpointed


def test_peer_failure_detection_does_not_swallow_bugs():
    from instdisc.cli import _is_peer_failure

    assert _is_peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert _is_peer_failure(RuntimeError("Timed out waiting 5000ms for recv operation to complete"))
    assert not _is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x2)"))


def test_worker_tracebacks_are_stripped_from_user_errors():
    try:
        raise DataError("image 3 of ds (ds/b/2.png) cannot be decoded: truncated.")
    except DataError as e:
        import traceback

        wrapped = "Caught DataError in DataLoader worker process 0.\nOriginal " + "".join(traceback.format_exception(e))
    assert str(DataError(wrapped)) == "image 3 of ds (ds/b/2.png) cannot be decoded: truncated."
    assert str(DataError("Caught you")) == "Caught you"


def test_workers_stop_when_a_bad_image_ends_the_iteration(tmp_path):
    """A decode error raised through the DataLoader workers must stop them at once, even while the
    exception is still alive: they ignore SIGTERM, so multiprocessing's exit-time terminate + join
    would otherwise wait for them forever (the suite once hung at exit on exactly this)."""
    import multiprocessing

    from instdisc.loader import eval_batches
    from instdisc.sources import open_source

    root = _folder(tmp_path / "ds", 80)
    _truncate(root / "train" / "b" / "2.png")
    images = open_source(str(root), "train", cache_dir=str(tmp_path / "cache"), image_size=32)
    caught = None
    try:
        for _ in eval_batches(images, 2, workers=1):
            pass
    except Exception as e:  # noqa: BLE001 - whichever error the bad file gives, kept alive on purpose
        caught = e
    assert caught is not None, "the truncated image was not found"
    assert multiprocessing.active_children() == [], "DataLoader workers outlived the failed iteration"
