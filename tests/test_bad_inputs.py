"""Every subcommand, given a bad value, exits with status 2 and one paragraph naming what is wrong:
no traceback, and no number printed that could be mistaken for a result.

One table walks the commands with missing, empty, wrong-type, out-of-range, non-finite, unwritable
and wrong-kind-of-file values. The commands run in-process (cli.main) against one tiny run made
once for the module (digits at 16 px, a width-4 network, a few steps).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from instdisc.cli import main

TINY = ["--data", "digits", "--image-size", "16", "--aug-size", "16", "--width", "4", "--batch-size", "64",
        "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--no-progress", "--device", "cpu"]
T = " ".join(TINY)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(rc: int, out: str, err: str, needle: str = "") -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("instdisc: warning:")]
    assert lines, "no message"
    paragraph = "\n".join(lines)
    assert "\n\n" not in paragraph and len(lines) == 1, f"not one paragraph:\n{err}"
    assert re.match(r"instdisc( [a-z]+)?: error: ", lines[0]), err
    assert needle in paragraph, (needle, err)
    # nothing that reads like a score: a bare number, or a percentage
    assert not re.search(r"^\s*\d+(\.\d+)?\s*$|\d%", out, re.M), out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run, its exported features, and some files that are wrong in one way each."""
    d = tmp_path_factory.mktemp("bad-inputs")
    run = d / "run"
    assert main(["train", "--method", "npid", "--nce-k", "0", "--out", str(run), *TINY]) == 0
    assert main(["embed", str(run), "--split", "train", "--out", str(d / "tr.npy"), "--device", "cpu"]) == 0
    assert main(["embed", str(run), "--split", "test", "--out", str(d / "te.npy"), "--device", "cpu"]) == 0
    x = np.load(d / "tr.npy")
    x[3, 1] = np.nan
    np.save(d / "nan.npy", x)
    np.save(d / "nan.labels.npy", np.load(d / "tr.labels.npy"))
    (d / "text.npy").write_text("not an array\n")
    (d / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 20)
    (d / "empty.npy").write_bytes(b"")
    # a run whose weights hold a NaN (as a diverged run's would)
    nanrun = d / "nanrun"
    (nanrun / "checkpoints").mkdir(parents=True)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.ndim == 4)
    ck["model"][key][0, 0, 0, 0] = float("nan")
    torch.save(ck, nanrun / "checkpoints" / "last.pt")
    (nanrun / "config.json").write_text(json.dumps(ck["config"]))
    ro = d / "readonly"
    ro.mkdir()
    return {"d": d, "run": run, "tr": d / "tr.npy", "te": d / "te.npy", "nanrun": nanrun}


# (argv template, a word the message must contain). {run}, {tr}, {te}, {d} are filled from `world`.
CASES = [
    # non-finite values: refused before anything is computed
    ("knn --train {d}/nan.npy --test {te}", "NaN or infinite"),
    ("knn --train {tr} --test {te} -t nan", "-t"),
    ("knn --train {tr} --test {te} -t inf", "-t"),
    ("linear --train {tr} --test {te} --lr nan --epochs 1", "--lr"),
    ("linear --train {tr} --test {te} --weight-decay nan --epochs 1", "--weight-decay"),
    ("lowshot --train {tr} --test {te} -C nan", "-C"),
    ("stages {run} --knn-t nan --epochs 1", "--knn-t"),
    ("knn {d}/nanrun", "not finite"),
    ("linear {d}/nanrun --epochs 1", "not finite"),
    ("train --out {d}/t-nan --nce-t nan " + T, "--nce-t"),
    ("train --out {d}/t-inf --lr inf " + T, "--lr"),
    ("train --out {d}/t-moco --method moco --moco-t nan " + T, "--moco-t"),
]


@pytest.mark.parametrize("template,needle", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_value_exits_2_with_one_paragraph(world, capsys, template, needle):
    argv = template.format(**{k: str(v) for k, v in world.items()}).split()
    rc, out, err = run_cli(argv, capsys)
    assert_refused(rc, out, err, needle)


def test_nan_in_features_is_found_whatever_the_row(tmp_path):
    from instdisc.errors import UserError
    from instdisc.features import load_features

    x = np.zeros((5, 3), np.float32)
    x[4, 2] = np.inf
    np.save(tmp_path / "f.npy", x)
    with pytest.raises(UserError, match="1 of 5 rows.*row 4"):
        load_features(tmp_path / "f.npy")
    x[4, 2] = 0
    np.save(tmp_path / "f.npy", x)
    assert load_features(tmp_path / "f.npy")[0].shape == (5, 3)


def test_library_checks_refuse_nan_too():
    from instdisc.errors import UserError
    from instdisc.evaluate import knn_table, linear_probe, low_shot

    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(UserError):
        knn_table(x, y, x, y, ks=[5], ts=[float("nan")], num_classes=2)
    with pytest.raises(UserError):
        linear_probe(x, y, x, y, num_classes=2, lrs=[float("nan")], epochs=1)
    with pytest.raises(UserError):
        low_shot(x, y, x, y, shots=[1], C=float("nan"))


def test_the_module_fixture_is_usable(world, capsys):
    """The table's refusals mean something only if the same commands work on good values."""
    rc, out, _ = run_cli(["knn", "--train", str(world["tr"]), "--test", str(world["te"]), "-k", "5"], capsys)
    assert rc == 0 and 0 <= float(out.strip().splitlines()[-1]) <= 100
    assert os.path.isdir(world["run"] / "checkpoints")
    assert Path(world["run"]).is_dir()
