"""The prepared GPU session (benchmarks/gpu_session.sh), rehearsed on CPU with tiny sizes, so that
no device minute is spent finding a typo: both invocations, every part's JSON, the chain's end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instdisc.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session  # noqa: E402


def _method_of(flags: list[str]) -> str:
    if "--method" in flags:
        return flags[flags.index("--method") + 1]
    return yaml.safe_load(Path(flags[flags.index("--config") + 1]).read_text())["method"]


def test_the_smoke_list_covers_every_method():
    assert {_method_of(f) for f in gpu_session.SMOKES.values()} == set(METHODS)


def test_every_smoke_command_parses_and_resolves(tmp_path):
    """What the rehearsal does not run (it trains two of the smokes) is at least a valid command."""
    from instdisc.cli import _pre_parse, _train_parser
    from instdisc.config import load_preset
    from instdisc.methods import resolve_config

    for name in gpu_session.SMOKES:
        argv = gpu_session.smoke_argv(name, "synthetic:64", str(tmp_path / name), 30, "cuda", "bf16", [])[1:]
        method, config, _ = _pre_parse(argv)
        args = _train_parser(method).parse_args(argv)
        cfg = resolve_config(load_preset(config) if config else {}, {k: v for k, v in vars(args).items() if "." in k}, method)
        assert cfg.run.method == method and cfg.run.max_steps == 30 and cfg.run.device == "cuda", name


def test_plan_keeps_the_recipe_batch_unless_a_larger_one_pays_and_compresses_what_cannot_fit():
    assert gpu_session.choose_batch({128: 10_000, 256: 10_800, 512: 11_000}) == 128
    assert gpu_session.choose_batch({128: 10_000, 256: 16_000, 512: 17_000}) == 256
    assert gpu_session.plan_schedule(20_000, 50_000, 600) == 200  # 240 fit: the recipe's 200
    assert gpu_session.plan_schedule(10_000, 50_000, 600) == 120


@pytest.mark.slow
def test_gpu_session_rehearsed_on_cpu(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {
        **os.environ, "OUT": str(out), "RUNS": str(runs), "PY": sys.executable, "OMP_WAIT_POLICY": "PASSIVE",
        "DEVICE": "cpu", "DATA": "synthetic:5200",  # > PIC's 5,000-image window, NPID's 4,096 negatives
        "TESTS": "tests/test_gpu_path.py", "SMOKE_STEPS": "2", "SMOKE_ONLY": "npid,pic-sampled-host-rows", "SMOKE_EXTRA": "--width 4 --batch-size 16",
        "PROBE_BATCHES": "32", "PROBE_STEPS": "2", "PROBE_EXTRA": "--width 4", "WORKERS": "1",
        "COMPILE": "", "OPT_IMPL": "auto", "BUDGET_S": "600", "COMPILE_S": "0", "MARGIN_S": "5",
        "RESUME_TRAIN_S": "60", "MAX_EPOCHS": "2", "RUN_EXTRA": "--width 4 --max-steps 30",
    }
    for mode in ("first", "resume"):
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), mode], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (mode, proc.stdout[-3000:], proc.stderr[-3000:])
    parts = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert parts["a_device"]["torch"]
    assert parts["b_tests"]["rc"] == 0
    smoke = parts["c_methods"]
    assert smoke["all_ok"], {k: v for k, v in smoke["methods"].items() if not v["ok"]}
    plan = parts["plan"]
    assert set(smoke["methods"]) == {"npid", "pic-sampled-host-rows"}
    assert plan["batch_size"] == 32 and plan["epochs"] >= 1 and plan["epochs"] <= 2
    first, final = parts["d_npid"], parts["e_npid_final"]
    assert first["complete"] is False and first["step"] == 30  # the first link stopped early ...
    assert final["complete"] is True and final["epochs_done"] == plan["epochs"]  # ... the second finished
    assert 0 <= final["knn_top1"] <= 100 and final["test_images"] > 0
    assert "e_npid_final" in (out / "summary.md").read_text()
