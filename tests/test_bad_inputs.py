"""Every subcommand, given a bad value, exits with status 2 and one paragraph naming what is wrong:
no traceback, and no number printed that could be mistaken for a result.

One table walks the commands with missing, empty, wrong-type, out-of-range, non-finite, unwritable
and wrong-kind-of-file values. The commands run in-process (cli.main) against one tiny run made
once for the module (digits at 16 px, a width-4 network, a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instdisc.cli import main

TINY = ["--data", "digits", "--image-size", "16", "--aug-size", "16", "--width", "4", "--batch-size", "64",
        "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--no-progress", "--device", "cpu"]
T = " ".join(TINY)
TN = T + " --nce-k 0"  # NPID (the default method)


PROGRESS = re.compile(r"\d+\.\d% \d+/\d+ \[")


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
    assert "weights_only" not in err  # torch's advice to unpickle whatever the file holds
    # warnings and progress lines (work done before a data-dependent check) are not the message
    lines = [ln for ln in err.strip().splitlines()
             if not ln.startswith("instdisc: warning:") and not PROGRESS.search(ln)]
    assert lines, "no message"
    paragraph = "\n".join(lines)
    assert "\n\n" not in paragraph and len(lines) == 1, f"not one paragraph:\n{err}"
    assert re.match(r"instdisc( [a-z]+){0,2}: error: ", lines[0]), err  # `data prepare`: two words
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
    shutil.copytree(run, d / "runcopy")  # for rows that would change a run if they were not refused
    for name, labels in (("neglab", np.load(d / "tr.labels.npy") - 5), ("flab", np.load(d / "tr.labels.npy") + 0.5)):
        np.save(d / f"{name}.npy", np.load(d / "tr.npy"))
        np.save(d / f"{name}.labels.npy", labels)  # negative ids indexed out of range; floats were truncated
    (d / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 20)
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "norows.npy", np.zeros((0, 8), np.float32))
    # a run whose weights hold a NaN (as a diverged run's would)
    nanrun = d / "nanrun"
    (nanrun / "checkpoints").mkdir(parents=True)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.ndim == 4)
    ck["model"][key][0, 0, 0, 0] = float("nan")
    torch.save(ck, nanrun / "checkpoints" / "last.pt")
    (nanrun / "config.json").write_text(json.dumps(ck["config"]))
    (d / "garbagerun" / "checkpoints").mkdir(parents=True)
    (d / "garbagerun" / "checkpoints" / "last.pt").write_bytes(b"\x00garbage" * 100)
    # a "checkpoint" that pickles a Python object: torch's refusal advises weights_only=False
    pickled = d / "pickled" / "checkpoints"
    pickled.mkdir(parents=True)
    torch.save({**ck, "extra": argparse.Namespace(a=1)}, pickled / "last.pt")
    # for `search`: a good query image, a fake one, a text file, an empty folder
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(d / "q.png")
    (d / "fake.png").write_bytes(b"not a png at all")
    (d / "notes.txt").write_text("not an image\n")
    (d / "emptydir").mkdir()
    (d / "mypage").mkdir()  # someone's folder: a search must not replace its index.html
    (d / "mypage" / "index.html").write_text("my page\n")
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
    ("train --out {d}/t-nan " + (TN) + " --nce-t nan", "--nce-t"),
    ("train --out {d}/t-inf " + (TN) + " --lr inf", "--lr"),
    ("train --out {d}/t-moco --method moco " + (T) + " --moco-t nan", "--moco-t"),
    # out of range, wrong type, missing, empty
    ("train --out {d}/t-seed " + (TN) + " --seed -1", "--seed"),
    ("train --out {d}/t-aug " + (TN) + " --aug-size 0", "--aug-size"),
    ("train --out {d}/t-aug2 " + (TN) + " --aug-flip-p 2", "--aug-flip-p"),
    ("train --out {d}/t-wk " + (TN) + " --workers -1", "--workers"),
    ("train --out {d}/t-type " + (TN) + " --epochs two", "--epochs"),
    ("train --out {d}/t-simclr --method simclr " + T + " --batch-size 1", "--batch-size"),
    ("train --out {d}/t-syn --data synthetic:9999999999 --epochs 1", "synthetic:N is limited"),
    ("train --out {d}/t-dev " + TN + " --device cuda:99", "--device"),
    ("train --out {d}/t-dev2 " + TN + " --device banana", "--device"),
    ("train --out {d}/t-data " + TN + " --data {d}/missing-folder", "not found"),
    ("train --out {d}/t-empty " + TN + " --data ''", "no data source"),
    ("train --out {d}/t-missing " + TN + " --data", "--data"),
    ("knn --train '' --test {te}", "run directory"),
    ("train --out {d}/t-cfg --config {d}/garbage.pt", "config file"),
    ("train --out {d}/t-ms " + TN + " --milestones -1", "--milestones"),
    ("train --out {d}/t-oom " + TN + " --aug-size 100000", "out of memory"),
    ("train --out {d}/garbage.pt " + TN, "garbage.pt"),
    ("knn {run} --seed -1", "--seed"),
    ("knn {run} --device cuda:99", "--device"),
    ("knn {run} --device banana", "--device"),
    ("knn {run} -k 0", "-k"),
    ("knn {run} -k ten", "-k"),
    ("knn --train {tr}", "--test"),
    ("knn", "run directory"),
    ("embed {run} --out {d}/e.npy --batch-size 0", "--batch-size"),
    ("embed {run}", "--out"),
    ("linear --train {tr} --test {te} --epochs 0", "--epochs"),
    ("lowshot --train {tr} --test {te} --shots 0", "--shots"),
    ("neighbors {run} --out {d}/nn.xyz", "--out"),
    ("neighbors {run} --out {d}/garbage.pt/nn.png", "--out"),
    ("neighbors {run} --out {d}/nn.png --ids 99999", "outside the test set"),
    ("map {run} --out {d}/m.png --max-points 0", "--max-points"),
    ("search {run} --query {d}/missing.png --out {d}/s", "--query"),
    ("search {run} --query {d}/emptydir --out {d}/s", "--query"),
    ("search {run} --query {d}/fake.png --out {d}/s", "--query"),
    ("search {run} --query {d}/notes.txt --out {d}/s", "--query"),
    ("search {run} --query {d}/q.png --index {d}/emptydir --out {d}/s", "--index"),
    ("search {run} --query {d}/q.png --index {d}/missing-folder --out {d}/s", "--index"),
    ("search {run} --query {d}/q.png --out {d}/s -k 0", "-k"),
    ("search {run} --query {d}/q.png --out {d}/s -k 5000", "-k 5000"),
    ("search {run} --query {d}/q.png --out {d}/garbage.pt", "--out"),
    ("search {d}/emptydir --query {d}/q.png --out {d}/s", "no checkpoint"),
    ("search {run} --out {d}/s", "--query"),
    ("report {run} --out {d}", "--out"),
    ("report {run} --data {d}/missing-folder", "not found"),
    ("clusters {run} --top 0", "--top"),
    ("demo --epochs 0", "--epochs"),
    # wrong kind of file
    ("knn --train {d}/text.npy --test {te}", "text.npy"),
    ("knn --train {d}/empty.npy --test {te}", "empty.npy"),
    ("knn --train {tr} --test {d}/garbage.pt", "garbage.pt"),
    ("knn {d}/garbage.pt", "garbage.pt"),
    ("embed {d}/garbage.pt --out {d}/e.npy", "garbage.pt"),
    ("knn {d}/pickled", "Python objects"),
    ("knn {d}/garbagerun", "is unreadable"),
    ("train --out {d}/garbagerun --resume", "is unreadable"),
    ("weights {d}/garbage.pt", "garbage.pt"),
    ("weights {d}/garbage.pt --layout banana", "--layout"),
    ("knn {run} --layout banana", "--layout"),
    ("train --out {d}/pickled --resume", "Python objects"),
    ("data check {d}/missing-folder", "not found"),
    ("data check {d}/garbage.pt", "garbage.pt"),
    # found by the session-6 audit (docs/reliability.md)
    ("knn --train {d}/neglab.npy --test {te}", "integer >= 0"),
    ("knn --train {d}/flab.npy --test {te}", "integer >= 0"),
    ("knn --train {d}/emptydir --test {te}", "not a regular file"),
    ("knn --train {tr} --test {d}/norows.npy", "holds no features"),
    ("knn {run} --train {tr} --test {te}", "not both"),
    ("lowshot --train {tr} --test {te} --shots 100000", "--shots"),
    ("report {d}/garbagerun", "is unreadable"),
    ("neighbours {run} --out {d}/nn.png -k 100000", "-k 100000"),
    ("data prepare {d}/emptydir {d}/prep --max-side 8 --workers -2", "--workers"),
    ("train --out {d}/t-ke " + TN + " --knn-every -1", "--knn-every"),
    ("export {run} --format timm --out {d}/w.pt --layout banana", "--layout"),
    ("export {run} --format timm --out {d}/w.pt --layout pic", "--layout pic"),
    ("train --out {d}/runcopy --resume --overwrite", "contradict"),
    # session 7
    ("weights {run}/checkpoints/last.pt", "instdisc training checkpoint"),
    ("stages --train {tr} --test {te}", "instdisc stages --help"),
    ("data check --workers 2 {d}", "instdisc data check --help"),
    ("report {run} --out {d}/garbage.pt/r.html", "--out"),
    ("embed {run} --out {d}/garbage.pt/e.npy", "--out"),
    ("linear --train {tr} --test {te} --features backbone --epochs 1", "--features backbone"),
    ("lowshot --train {tr} --test {te} --data digits", "--data"),
    ("knn --train {tr} --test {te} --layout pic", "--layout"),
    ("knn --train {tr} --test {te} --drop-unknown-classes", "--drop-unknown-classes"),
    ("linear {run} --augmented --features embedding --epochs 1", "--features embedding"),
    # found by the session-7 audit (docs/reliability.md, "Bad-input audit (session 7)")
    ("knn --train {tr} --test {te} --batch-size 7", "--batch-size"),
    ("knn --train {tr} --test {te} --cache-dir {d}", "--cache-dir"),
    ("linear --train {tr} --test {te} --no-cache --epochs 1", "--no-cache"),
    ("lowshot --train {tr} --test {te} --device cuda", "--device cuda"),
    ("search {run} --query {d}/q.png --out {d}/mypage", "no `instdisc search` wrote"),
    ("export {d}/runcopy --format torchvision --out {d}/runcopy/checkpoints/last.pt", "this command reads"),
    ("export {run} --format safetensors --out {run}/config.json", "is a file of the run"),
    ("train --out {d}/t-lgn " + TN + " --logger none tensorboard", "--logger none"),
    ("train --out {d}/t-qs " + TN + " --quality-subset 100000", "--quality-subset 100000"),
    ("train --out {d}/t-rb --resume banana", "instdisc train: error: argument --resume"),  # was `instdisc: error`
    ("demo --out {d}/garbage.pt", "--out"),  # was "cannot write to the run directory ...: File exists"
]


@pytest.mark.parametrize("template,needle", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_value_exits_2_with_one_paragraph(world, capsys, template, needle):
    argv = ["" if a == "''" else a for a in template.format(**{k: str(v) for k, v in world.items()}).split()]
    rc, out, err = run_cli(argv, capsys)
    assert_refused(rc, out, err, needle)


@pytest.mark.parametrize("template", [
    "report {run} --out {d}/garbage.pt/r.html", "embed {run} --out {d}/garbage.pt/e.npy",
    "neighbours {run} --out {d}/garbage.pt/nn.png", "map {run} --out {d}/garbage.pt/m.png"])
def test_an_unwritable_out_is_refused_before_any_image_is_embedded(world, capsys, monkeypatch, template):
    import instdisc.evaluate as E

    def embedded(*a, **kw):
        raise AssertionError("images embedded before --out was checked")

    for name in ("features_for", "extract", "open_images"):
        monkeypatch.setattr(E, name, embedded)
    rc, out, err = run_cli(template.format(**{k: str(v) for k, v in world.items()}).split(), capsys)
    assert_refused(rc, out, err, "--out")


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


def _tiny_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path, capsys):
    root = _tiny_folder(tmp_path / "ds")
    os.mkfifo(root / "train" / "a" / "x.png")  # opening it for reading would block forever
    rc, out, err = run_cli(["data", "check", str(root)], capsys)
    assert rc == 1 and "x.png: not a regular file" in out and "NOT OK" in out
    rc, out, err = run_cli(["train", "--out", str(tmp_path / "r"), *TINY, "--nce-k", "0", "--data", str(root)], capsys)
    assert_refused(rc, out, err, "not a regular file")


def test_data_check_and_the_loader_judge_a_pic_zip_alike(tmp_path, capsys):
    import io
    import zipfile

    from PIL import Image

    from instdisc.datacheck import check_source
    from instdisc.errors import DataError
    from instdisc.sources import open_source

    for side in (8, 100):  # small images are decoded at open, large ones streamed
        root = tmp_path / f"pic{side}"
        root.mkdir()
        with zipfile.ZipFile(root / "train.zip", "w") as zf:
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (side, side), (i * 40, 0, 0)).save(buf, "PNG")
                zf.writestr(f"n{i % 2}/{i}.png", buf.getvalue())
        (root / "train_map.txt").write_text("".join(f"n{i % 2}/{i}.png\t{i % 2}\n" for i in range(4)) + "n1/ghost.png\t1\n")
        # the folder or its zip: the same plan (the zip alone would be an archive without the map)
        for spec in (root, root / "train.zip"):
            report = check_source(str(spec), progress=False)
            assert not report.ok() and [r for _, r in report.bad] == ["missing from the archive"], spec
            with pytest.raises(DataError, match="ghost.png") as e:
                open_source(str(spec), "train", cache_dir=tmp_path / "cache", progress=False)
            if side == 8:  # decoded at open: the message sends the user to the check of the folder
                assert f"instdisc data check {root}`" in str(e.value)
    # a complete map read through the zip's name keeps the map's order (not the zip's folder order)
    root = tmp_path / "pic8"
    (root / "train_map.txt").write_text("n1/3.png\t1\nn0/0.png\t0\nn1/1.png\t1\nn0/2.png\t0\n")
    ims = open_source(str(root / "train.zip"), "train", cache_dir=tmp_path / "cache", progress=False)
    assert list(ims.labels) == [1, 0, 1, 0] and ims.images[0].max() == 120  # image 3 first


def test_milestones_past_the_end_warn(tmp_path, capsys):
    from instdisc.errors import InstdiscWarning

    with pytest.warns(InstdiscWarning, match="--milestones 5 9 are not before --epochs 1"):
        rc, _, _ = run_cli(["train", "--out", str(tmp_path / "r"), *TINY, "--nce-k", "0", "--milestones", "5", "9"],
                           capsys)
    assert rc == 0


def test_every_warning_is_one_line_without_a_source_path(capsys):
    from instdisc.cli import _formatwarning

    text = _formatwarning(UserWarning("a library's\nwarning"), UserWarning, "/x/y.py", 3, "code()")
    assert text == "instdisc: warning: UserWarning: a library's warning\n"


def test_one_device_resolver():
    from instdisc.dist import resolve_device
    from instdisc.errors import UserError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="--device cuda:99"):
        resolve_device("cuda:99")


def test_linear_augmented_trains_at_its_documented_lr(world, capsys, monkeypatch):
    import instdisc.evaluate as E

    seen = []

    def fake(subject, tr, te, *, lr, **kw):
        seen.append(lr)
        return {"top1": 1.0, "top5": 2.0, "lr": lr, "norm": kw["norm"], "epochs": kw["epochs"], "time_s": 0.0}

    monkeypatch.setattr(E, "linear_probe_augmented", fake)
    assert run_cli(["linear", str(world["run"]), "--augmented", "--epochs", "1", "--device", "cpu"], capsys)[0] == 0
    assert run_cli(["linear", str(world["run"]), "--augmented", "--epochs", "1", "--device", "cpu", "--lr", "0.5"],
                   capsys)[0] == 0
    assert seen == [0.1, 0.5]  # not the first value of the cached probe's grid (0.001)
    rc, out, err = run_cli(["linear", str(world["run"]), "--augmented", "--lr", "0.1", "1", "--device", "cpu"], capsys)
    assert_refused(rc, out, err, "one --lr")


@pytest.mark.parametrize("method", sorted(__import__("instdisc.methods", fromlist=["METHODS"]).METHODS))
def test_every_method_trains_on_digits_with_its_defaults(tmp_path, capsys, method):
    """No size flag: the method's negatives / clusters / queue / classes are chosen for N = 1437
    and said in one line; only the run length and the network's width are made tiny here."""
    rc, out, err = run_cli(["train", "--method", method, "--data", "digits", "--out", str(tmp_path / "r"),
                            "--epochs", "1", "--max-steps", "1", "--width", "4", "--knn-every", "0",
                            "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert all(v is not None for v in cfg["method"].values() if not isinstance(v, str)) or method == "supervised"
    chosen = [ln for ln in out.splitlines() if ln.startswith("instdisc: for N = 1437")]
    assert len(chosen) <= 1
    if method in ("npid", "moco", "sela", "supervised"):
        assert chosen, out


def test_an_explicit_size_that_does_not_fit_keeps_its_error(tmp_path, capsys):
    for flags, needle in ((["--nce-k", "4096"], "--nce-k must be in [0, N)"),
                          (["--method", "sela", "--ncl", "3000"], "--ncl values must be in [2, N]"),
                          (["--method", "pic", "--queue-size", "5000"], "--queue-size must be in [0, N)")):
        rc, out, err = run_cli(["train", "--out", str(tmp_path / "r"), *TINY, *flags], capsys)
        assert_refused(rc, out, err, needle)


def test_size_defaults_follow_n():
    from instdisc.methods.moco import MoCoConfig
    from instdisc.methods.npid import NPIDConfig
    from instdisc.methods.sela import SeLaConfig

    assert NPIDConfig().fill_defaults(50_000) == ["--nce-k 4096 (the paper's)"]
    c = NPIDConfig()
    c.fill_defaults(1437)
    assert c.nce_k == 0
    c = MoCoConfig()
    c.fill_defaults(50_000)
    assert c.moco_k == 16384
    c = MoCoConfig()
    c.fill_defaults(2_000_000)
    assert c.moco_k == 65536
    c = SeLaConfig()
    c.fill_defaults(1437)
    assert c.ncl == [143]
    c = NPIDConfig(nce_k=7)
    assert c.fill_defaults(10) == [] and c.nce_k == 7  # given: kept, judged by validate


def test_the_digits_preset_is_the_demos():
    from instdisc.config import load_preset
    from instdisc.demo import DEMO_PRESET

    root = Path(__file__).resolve().parents[1]
    preset = load_preset(root / "configs" / "npid_digits.yaml")
    demo = {k: v for k, v in DEMO_PRESET.items() if k != "device"}
    assert preset == {"method": "npid", **demo}


def _all_parsers():
    from instdisc.cli import _train_parser, build_parser
    from instdisc.methods import METHODS

    todo = [build_parser()]
    seen = []
    while todo:
        p = todo.pop()
        seen.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [q for name, q in a.choices.items() if name != "train"]
    return seen + [_train_parser(m) for m in METHODS]


def test_every_option_of_every_command_has_help_and_says_its_default_once():
    for p in _all_parsers():
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
            assert a.help and a.help != argparse.SUPPRESS, f"{where} has no help"
            assert len(re.findall(r"\bdefault\b[: ]", a.help.lower())) <= 1, f"{where} says its default twice: {a.help}"


def test_version_and_data_alone(capsys):
    from instdisc import __version__

    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"instdisc {__version__}"
    rc, out, err = run_cli(["data"], capsys)
    assert rc == 2 and "usage: instdisc data" in out + err and "check" in out + err


@pytest.mark.parametrize("method,reads", [("npid", "(memory bank)"), ("simclr", "(train set re-embedded)")])
def test_the_knn_monitor_says_what_it_reads(tmp_path, capsys, method, reads):
    rc, out, err = run_cli(["train", "--method", method, "--data", "digits", "--image-size", "16", "--aug-size", "16",
                            "--width", "4", "--batch-size", "256", "--epochs", "1", "--knn-every", "1",
                            "--no-progress", "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("epoch 1/1"))
    assert "kNN top-1" in line and reads in line


def test_a_tsne_map_of_very_few_points_is_drawn(world, capsys, tmp_path):
    rc, out, err = run_cli(["map", str(world["run"]), "--out", str(tmp_path / "m.png"), "--method", "tsne",
                            "--max-points", "3", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert (tmp_path / "m.png").stat().st_size > 0


def test_a_demo_stopped_by_a_signal_prints_no_comparison_and_not_status_0(tmp_path, capsys, monkeypatch):
    """SIGTERM mid-demo used to print "NPID (60 epochs)" scores of the half-trained model, status 0."""
    import instdisc.demo as demo

    monkeypatch.setattr(demo, "fit", lambda cfg, env, **kw: {"stopped": "SIGTERM", "signal": 15})
    rc, out, err = run_cli(["demo", "--out", str(tmp_path / "d"), "--epochs", "1"], capsys)
    assert rc == 128 + 15
    assert "random init" not in out and not re.search(r"\d%", out), out
    assert "no comparison is printed" in err


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "abc"}, "$WORLD_SIZE must be an integer"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "$RANK must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "$MASTER_ADDR, $MASTER_PORT are not set"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "$RANK 3 is not a rank"),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "0",
      "MASTER_ADDR": "127.0.0.1", "SLURM_JOB_ID": "1"}, "$SLURM_PROCID 5 is not a rank"),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "-3", "SLURM_PROCID": "0"}, "$SLURM_NTASKS must be"),
])
def test_odd_launcher_variables_exit_2_naming_the_variable(world, capsys, monkeypatch, env, needle):
    """int() on $WORLD_SIZE was a traceback; a rank outside the world, or a world without its
    rendezvous, waited for peers that never come (a hang) or failed inside torch."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, out, err = run_cli(["train", "--out", str(world["d"] / "t-env"), *TINY, "--nce-k", "0"], capsys)
    assert_refused(rc, out, err, needle)


def test_export_onto_its_own_input_leaves_the_input_as_it_was(world, capsys):
    ck = world["d"] / "runcopy" / "checkpoints" / "last.pt"
    before = ck.read_bytes()
    rc, out, err = run_cli(["export", str(world["d"] / "runcopy"), "--format", "torchvision", "--out", str(ck)], capsys)
    assert_refused(rc, out, err, "--out")
    assert ck.read_bytes() == before
