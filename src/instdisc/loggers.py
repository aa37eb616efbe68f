"""Where the training metrics are mirrored besides RUN_DIR/metrics.jsonl (`--logger`).

metrics.jsonl stays the record (the report and every test read it); a logger is a viewer of the
same numbers: TensorBoard (RUN_DIR/tb/), Weights & Biases, MLflow. All optional, none installed
by default; rank 0 only. The remote run's id is saved in the checkpoint, so that `--resume`
continues the same wandb / MLflow run instead of starting a second one.

- tensorboard: the default, written when the `tensorboard` package is installed (else skipped
  without a word); `--logger tensorboard` typed without the package is refused; tags
  "step/loss", "epoch/knn_top1", ...
- wandb: offline unless WANDB_MODE says otherwise (a compute node without network must never
  wait on a login prompt; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later); project from
  WANDB_PROJECT, else "instdisc"; files under RUN_DIR/wandb.
- mlflow: MLFLOW_TRACKING_URI when set (your server), else a local file store RUN_DIR/mlruns
  (`mlflow ui --backend-store-uri RUN_DIR/mlruns`); experiment from MLFLOW_EXPERIMENT_NAME, else
  "instdisc".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from instdisc.errors import ConfigError, UserError

LOGGERS = ("tensorboard", "wandb", "mlflow", "none")


class Logger(Protocol):
    name: str
    run_id: str | None  # what --resume needs to continue the same remote run (None: nothing)

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numeric(rec: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, tagged by its type: {"epoch/knn_top1": 51.2, ...}."""
    kind = rec.get("type", "log")
    return {f"{kind}/{k}": float(v) for k, v in rec.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard SummaryWriter when the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's wrapper needs the tensorboard package; it is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoard:
    name, run_id = "tensorboard", None

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "instdisc"), name=run_dir.name, dir=str(run_dir),
            config=config, id=run_id, resume="allow" if run_id else None,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        )
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        # wandb drops a step below its last one (lines re-logged after a resume): the same values.
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the one
            # backend that needs no server and no database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        with _start_quickly():
            self.run_id = self._start(run_dir, config, run_id)

    def _start(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> str:
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "instdisc")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=run_dir.name)
            run_id = run.info.run_id
            for section, values in config.items():
                for k, v in (values.items() if isinstance(values, dict) else [("", values)]):
                    self.client.log_param(run_id, f"{section}.{k}" if k else section, str(v)[:500])
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        # MLflow keys allow "/"; one batch call per record.
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@contextlib.contextmanager
def _start_quickly() -> Iterator[None]:
    """MLflow's HTTP client retries a failed request 7 times with backoff (~4 minutes, for rate
    limits) before it raises: an unreachable MLFLOW_TRACKING_URI would stall the launch that long
    in silence. The calls that open the run get one retry and a 20 s timeout, so a wrong server is
    refused at once; the logging during training keeps MLflow's patience. A value the user set wins."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    added = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def check_loggers(names: list[str], *, asked: bool = False) -> None:
    """Refuse an unknown logger, one whose package is missing, or `none` beside another, before
    any work (exit 2).

    ``asked``: the names were typed on this command line. TensorBoard is the default and skipped
    where its package is missing; asked for by name, it is refused like the others instead.
    """
    if "none" in names and len(set(names)) > 1:
        others = " ".join(n for n in dict.fromkeys(names) if n != "none")
        raise ConfigError(f"--logger none means metrics.jsonl only, but {others} {'is' if ' ' not in others else 'are'} "
                          "given too: give one or the other.")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--logger {name!r} is not one of {', '.join(LOGGERS)}.")
        if name == "tensorboard" and asked and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--logger tensorboard needs the tensorboard package: pip install "
                              "'instdisc[tensorboard]' (without --logger, TensorBoard is used only where it is installed).")
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            # each logger's extra in pyproject.toml is named after it
            raise ConfigError(f"--logger {name} needs the {name} package: pip install 'instdisc[{name}]'.")


def open_loggers(names: list[str], run_dir: Path, config: dict[str, Any],
                 run_ids: dict[str, str] | None = None) -> list[Logger]:
    """The loggers of a run (rank 0). `run_ids`: the checkpoint's, to continue the same remote runs."""
    check_loggers(names)
    run_ids = run_ids or {}
    out: list[Logger] = []
    for name in dict.fromkeys(names):
        try:
            if name == "tensorboard":
                writer = tensorboard_writer(run_dir / "tb")
                if writer is not None:
                    out.append(TensorBoard(writer))
            elif name == "wandb":
                out.append(Wandb(run_dir, config, run_ids.get("wandb")))
            elif name == "mlflow":
                out.append(Mlflow(run_dir, config, run_ids.get("mlflow")))
        except Exception as e:  # a login, a server, a broken install: say which logger, not a traceback
            for lg in out:
                lg.close()
            raise UserError(f"--logger {name} could not start: {type(e).__name__}: {e}. "
                            "Training has not begun; fix it or choose another --logger.") from None
    return out
