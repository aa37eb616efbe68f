"""A run folder belongs to one training at a time, and nothing in it describes another model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from instdisc.cli import main

TINY = ["--data", "digits", "--image-size", "16", "--aug-size", "16", "--width", "4", "--batch-size", "64",
        "--nce-k", "0", "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--no-progress", "--device", "cpu"]
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

HOLD = """
import sys, time
from pathlib import Path
from instdisc.rundir import RunLock
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
RunLock(out).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(out):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=SUB_ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_training_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        capsys.readouterr()
        assert main(["train", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host" in err and "in use by another training" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_training_is_stale_and_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()  # the file stays; the lock does not
    assert main(["train", "--out", str(out), *TINY]) == 0
    assert f"pid {os.getpid()}" in (out / ".lock").read_text()
    # released at the end: the next command may take it
    assert main(["train", "--out", str(out), *TINY, "--resume", "--epochs", "1"]) == 0


def test_overwrite_removes_the_old_models_results_and_the_report_marks_stale_ones(tmp_path, capsys):
    from instdisc.evaluate import load_results
    from instdisc.report import evaluation_html

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    assert main(["knn", str(out), "-k", "5", "--device", "cpu"]) == 0
    assert (out / "eval" / "knn.json").is_file() and not load_results(out)["knn"]["stale"]
    time.sleep(0.01)
    assert main(["train", "--out", str(out), *TINY, "--resume", "--epochs", "2", "--max-steps", "3"]) == 0
    res = load_results(out)
    assert res["knn"]["stale"]  # computed for the checkpoint before this one
    assert "STALE" in evaluation_html(res)
    assert main(["train", "--out", str(out), *TINY, "--overwrite", "--seed", "1"]) == 0
    assert not (out / "eval" / "knn.json").exists() and load_results(out) == {}


def test_demo_refuses_a_training_run_but_replaces_an_earlier_demo(tmp_path, capsys, monkeypatch):
    import instdisc.demo as demo

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    before = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before

    # an earlier demo (same recipe, other epochs) is replaced without --overwrite
    monkeypatch.setattr(demo, "DEMO_PRESET", {**demo.DEMO_PRESET, "width": 4, "batch_size": 64, "max_steps": 2,
                                              "knn_every": 0, "progress": False})
    d = tmp_path / "demo"
    assert main(["demo", "--out", str(d), "--epochs", "2"]) == 0
    assert main(["demo", "--out", str(d), "--epochs", "1"]) == 0
    assert json.loads((d / "config.json").read_text())["optim"]["epochs"] == 1
    assert main(["demo", "--out", str(out), "--epochs", "1", "--overwrite"]) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_the_lock_is_released_when_training_fails(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--lr", "1e30", "--aug-size", "16"]) in (0, 2)
    from instdisc.rundir import RunLock

    lock = RunLock(out)
    lock.acquire()  # would raise if the failed run still held it
    lock.release()
