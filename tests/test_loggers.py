"""--logger: the metrics of metrics.jsonl mirrored to wandb (offline) and MLflow (local file store),
the same numbers, and the same remote run continued by --resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from instdisc.cli import main

TINY = ["--method", "npid", "--data", "synthetic:192", "--arch", "resnet18", "--width", "4", "--aug-size", "16",
        "--batch-size", "64", "--epochs", "2", "--schedule", "cosine", "--log-every", "1", "--no-progress",
        "--quality-subset", "0"]


@pytest.fixture()
def isolated(monkeypatch, tmp_path):
    # No user configuration leaks in, nothing leaves the machine.
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_gets_the_numbers_of_metrics_jsonl_and_resume_continues_its_run(tmp_path, isolated):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run = tmp_path / "run"
    args = ["train", *TINY, "--logger", "mlflow", "--out", str(run)]
    assert main([*args, "--max-steps", "3"]) == 0
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    run_id = ck["loggers"]["mlflow"]
    assert main([*args, "--resume"]) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["loggers"] == {"mlflow": run_id}

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("instdisc")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]  # one run, not two
    assert client.get_run(run_id).info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "step/loss")}
    logged = {r["step"]: r["loss"] for r in records(run) if r["type"] == "step"}
    assert history == pytest.approx(logged) and len(logged) == 6
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/loss")}
    assert epochs == pytest.approx({r["step"]: r["loss"] for r in records(run) if r["type"] in ("epoch", "epoch_part")})
    assert client.get_run(run_id).data.params["optim.batch_size"] == "64"


def test_wandb_offline_run_is_written_and_resumed_with_the_same_id(tmp_path, isolated):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    args = ["train", *TINY, "--logger", "wandb", "--out", str(run)]
    assert main([*args, "--max-steps", "3"]) == 0
    run_id = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["loggers"]["wandb"]
    assert main([*args, "--resume"]) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["loggers"]["wandb"] == run_id
    offline = [p for p in (run / "wandb").iterdir() if p.name.startswith("offline-run-")]
    # Both launches wrote into the one offline run (its id in the folder names); nothing online.
    assert offline and all(p.name.endswith(run_id) for p in offline)
    assert any(f.suffix == ".wandb" for p in offline for f in p.iterdir())


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_logger_that_is_not_installed_is_refused_before_any_work(tmp_path, monkeypatch, capsys, name):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--logger", name, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'instdisc[{name}]'" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


def test_tensorboard_by_default_is_skipped_where_it_is_missing(tmp_path, monkeypatch, isolated):
    """Only the default is skipped without a word; typed by name it is refused (test above)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "tensorboard" else real(mod, *a))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(run)]) == 0
    assert not (run / "tb").exists()


def test_unknown_logger_exits_2(tmp_path, capsys):
    assert main(["train", *TINY, "--logger", "comet", "--out", str(tmp_path / "r")]) == 2
    assert "--logger 'comet' is not one of" in capsys.readouterr().err


def test_none_logs_to_metrics_jsonl_only(tmp_path, isolated):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--logger", "none", "--max-steps", "2", "--out", str(run)]) == 0
    assert not (run / "tb").exists() and not (run / "wandb").exists() and not (run / "mlruns").exists()
    assert len([r for r in records(run) if r["type"] == "step"]) == 2
    assert os.path.exists(run / "checkpoints" / "last.pt")


def test_the_install_line_of_every_logger_names_an_extra_that_exists():
    """The refusal says pip install 'instdisc[NAME]': each logger with a package has that extra."""
    from pathlib import Path

    from instdisc.loggers import LOGGERS

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"wandb", "mlflow", "tensorboard"} <= set(extras) and set(LOGGERS) - {"none"} <= set(extras)


def test_an_unreachable_mlflow_server_is_refused_at_once_not_after_minutes_of_retries(tmp_path, isolated, monkeypatch):
    """MLflow retries a failed request 7 times with backoff (~4 minutes) before it raises; the
    launch stalled that long in silence. Nothing listens on port 9 of this machine."""
    import time

    from instdisc.errors import UserError
    from instdisc.loggers import open_loggers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="--logger mlflow could not start"):
        open_loggers(["mlflow"], tmp_path, {}, None)
    assert time.monotonic() - t0 < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # training's own requests keep MLflow's patience
