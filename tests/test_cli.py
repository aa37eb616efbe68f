"""End to end through the command line, on the built-in synthetic source (CPU, seconds)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from instdisc.cli import main

COMMON = ["--data", "synthetic:192", "--arch", "resnet18", "--width", "8", "--batch-size", "32",
          "--nce-k", "32", "--knn-k", "10", "--no-progress", "--device", "cpu", "--milestones", "100"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def train(out, *extra):
    return main(["train", "--method", "npid", "--out", str(out), *COMMON, *extra])


def test_train_embed_knn_round_trip(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2") == 0
    assert (run / "config.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["nce_k"] == 32 and cfg["optim"]["epochs"] == 2
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines if ln["type"] == "epoch"] == [1, 2]
    assert all("knn_top1" in ln for ln in lines if ln["type"] == "epoch")
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # plain state, no pickled objects
    assert ck["method"] == "npid" and "memory.bank" in ck["model"]

    for split in ("train", "test"):
        assert main(["embed", str(run), "--split", split, "--out", str(tmp_path / f"{split}.npy")]) == 0
    tr = np.load(tmp_path / "train.npy")
    lab = np.load(tmp_path / "train.labels.npy")
    assert tr.shape == (192, 128) and tr.dtype == np.float32 and lab.shape == (192,) and lab.dtype == np.int64
    assert np.allclose(np.linalg.norm(tr, axis=1), 1, atol=1e-4)
    meta = json.loads((tmp_path / "train.meta.json").read_text())
    assert meta["split"] == "train" and meta["method"] == "npid"

    capsys.readouterr()
    assert main(["knn", "--train", str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy"), "-k", "10"]) == 0
    from_files = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["knn", str(run), "-k", "10"]) == 0
    from_run = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_files == pytest.approx(from_run, abs=1e-6)
    assert 0.0 <= from_files <= 100.0


def test_resume_mid_epoch_is_bit_identical(tmp_path, cache):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, "--epochs", "2") == 0
    # Stop at step 9 of 12 (mid-epoch 2), then resume to the end.
    assert train(part, "--epochs", "2", "--max-steps", "9") == 0
    ck = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    state = ck["state"]
    assert {k: state[k] for k in ("epoch", "epoch_step", "step", "skipped")} == {
        "epoch": 1, "epoch_step": 3, "step": 9, "skipped": 0}
    assert state["epoch_loss_steps"] == 3 and state["epoch_loss_sum"] > 0
    assert train(part, "--epochs", "2", "--resume") == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["state"] == b["state"]
    # The epoch lines agree too: epoch 2's mean loss covers all its steps, not only the resumed ones.
    def epochs(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["loss"]) for r in recs if r["type"] == "epoch"]

    assert epochs(full) == epochs(part) and len(epochs(full)) == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["model"]["memory.bank"], b["model"]["memory.bank"])


def test_resume_auto_starts_an_absent_run_then_continues_it_bit_identically(tmp_path, cache, capsys):
    # One command line for every launch: the first starts the run (--out absent), the relaunch after
    # a stop continues it, and the end state is that of a run left alone.
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, "--epochs", "2") == 0
    relaunch = ["--epochs", "2", "--resume", "auto"]
    assert train(part, *relaunch, "--max-steps", "9") == 0
    assert torch.load(part / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 9
    capsys.readouterr()
    assert train(part, *relaunch) == 0
    assert "resuming at epoch 1 step 9" in capsys.readouterr().out
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["state"] == b["state"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # Finished: a further relaunch continues (nothing left to do) and still does not start over.
    assert train(part, *relaunch) == 0
    assert torch.load(part / "checkpoints" / "last.pt", weights_only=True)["state"] == b["state"]


def test_resume_auto_starts_in_an_empty_or_unsaved_folder_and_refuses_anything_else(tmp_path, cache, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(empty, "--epochs", "1", "--max-steps", "2", "--resume", "auto") == 0
    assert (empty / "checkpoints" / "last.pt").is_file()
    # A launch stopped before its first checkpoint left a config, a lock and step lines: started over.
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "config.json").write_text("{}")
    (unsaved / ".lock").write_text("pid 1")
    (unsaved / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 9.0}\n')
    assert train(unsaved, "--epochs", "1", "--max-steps", "2", "--log-every", "1", "--resume", "auto") == 0
    steps = [json.loads(ln)["step"] for ln in (unsaved / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["type"] == "step"]
    assert steps == [1, 2] and json.loads((unsaved / "config.json").read_text())["run"]["method"] == "npid"
    # Not a run: refused, and nothing in it is touched.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert train(other, "--epochs", "1", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and "notes.txt" in err and "Traceback" not in err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit) as e:  # argparse's refusal: status 2, one line naming the flag
        train(other, "--epochs", "1", "--resume", "sometimes")
    assert e.value.code == 2 and "the only value --resume takes is auto" in capsys.readouterr().err
    assert train(empty, "--epochs", "1", "--resume", "auto", "--overwrite") == 2
    # Plain --resume keeps its meaning: an empty folder has nothing to continue.
    (tmp_path / "empty2").mkdir()
    assert train(tmp_path / "empty2", "--epochs", "1", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_ckpt_every_epochs_saves_every_nth_epoch_the_last_and_at_a_stop(tmp_path, cache, monkeypatch):
    import instdisc.rundir as rundir

    saved = []
    real = rundir.save_checkpoint
    monkeypatch.setattr(rundir, "save_checkpoint", lambda d, st: saved.append(dict(st["state"])) or real(d, st))
    # 6 steps per epoch; 5 epochs, every 2nd: after epochs 2, 4 and the last (5).
    assert train(tmp_path / "a", "--epochs", "5", "--ckpt-every-epochs", "2", "--knn-every", "0") == 0
    assert [s["epoch"] for s in saved] == [2, 4, 5]
    # A stop between two due epochs (--max-steps 20: epoch 4, step 2) still leaves the exact state.
    saved.clear()
    assert train(tmp_path / "b", "--epochs", "5", "--ckpt-every-epochs", "3", "--max-steps", "20", "--knn-every", "0") == 0
    assert [(s["epoch"], s["step"]) for s in saved] == [(3, 18), (3, 20)]
    assert train(tmp_path / "b", "--epochs", "5", "--resume") == 0
    assert train(tmp_path / "c", "--epochs", "5", "--knn-every", "0") == 0
    a = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    c = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)
    assert a["state"] == c["state"] and all(torch.equal(a["model"][k], c["model"][k]) for k in c["model"])


def test_refuses_to_overwrite_and_rejects_changed_flags_on_resume(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert train(run, "--epochs", "1") == 0
    assert train(run, "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train(run, "--epochs", "1", "--nce-t", "0.5", "--resume") == 2
    assert "cannot change" in capsys.readouterr().err
    assert train(run, "--epochs", "1", "--overwrite") == 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--nce-t", "0"], "--nce-t must be > 0"),
        (["--nce-m", "1"], "--nce-m must be in [0, 1)"),
        (["--nce-k", "5000"], "--nce-k must be in [0, N)"),
        (["--batch-size", "1000"], "larger than the training set"),
        (["--data", "/nonexistent/folder"], "nonexistent"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, cache, capsys, argv, needle):
    assert main(["train", "--out", str(tmp_path / "r"), *COMMON, "--epochs", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instdisc: error:") and needle in err and "Traceback" not in err


def test_unknown_config_key_suggests(tmp_path, cache, capsys):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("nce_kk: 3\n")
    assert main(["train", "--config", str(cfgf), "--out", str(tmp_path / "r")]) == 2
    assert "Did you mean 'nce_k'" in capsys.readouterr().err


def test_help_texts_and_module_entry_point():
    for argv in (["--help"], ["train", "--help"], ["embed", "--help"], ["knn", "--help"], ["data", "check", "--help"]):
        res = subprocess.run([sys.executable, "-m", "instdisc", *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "usage:" in res.stdout
    res = subprocess.run([sys.executable, "-m", "instdisc", "train", "--help"], capture_output=True, text=True)
    assert "--nce-k" in res.stdout and "--aug-scale" in res.stdout and "--resume" in res.stdout


def test_non_finite_loss_stops_with_the_step_and_keeps_no_partial_state(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert train(run, "--epochs", "1", "--lr", "1e30", "--nce-k", "0") == 2
    err = capsys.readouterr().err
    assert "the loss became" in err and "at step" in err and "Traceback" not in err
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing half-trained was saved
