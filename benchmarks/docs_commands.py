"""Every `instdisc` command in README.md and docs/*.md, extracted from their code blocks, checked
against the real argument parser and (with --run) actually run on `--data digits`.

    .venv/bin/python benchmarks/docs_commands.py --run --md /tmp/docs_commands.md

Running: the commands run in doc order in an empty temporary folder (so every relative output --
runs/..., feats/..., nn.png, r18.pth -- lands there; configs/ is linked in), with only these
substitutions, each one recorded in the table:

* `--data X` -> `--data digits` (the built-in 1,437 + 360 images), and a data folder given as a
  positional argument (`data check PATH`, `data prepare SRC DST`) -> a small ImageFolder written
  from digits;
* the placeholders RUN / RUN_DIR -> runs/digits (the README's first command trains it), C.yaml ->
  configs/npid_digits.yaml, `...` dropped (or PATH where a flag needs a value), `[--full]` ->
  --full;
* a size set for a larger training set than digits' 1,437 images (a CIFAR-10 preset's --nce-k
  4096, PIC's --window 5000 or --queue-size 65536: the methods refuse them on 1,437 images) -> the value the method
  chooses itself for 1,437 images;
* a training preset of more than 10 epochs (other than the digits preset) gets `--epochs 1`
  (`linear --augmented --epochs 100` gets `--epochs 2`): the command's flags are all exercised,
  its recipe's number is not what this measures;
* `instdisc search`'s images, written from digits (make_search_images): the query `photo.jpg` (one
  JPEG), the query folder `queries/` (10 images, no class folders), the index folders `~/photos`,
  `~/holiday-photos` -> `photos/` (100 images, unlabelled); in the shorthand `--query IMG|DIR
  [--index DIR] --out DIR`: IMG -> photo.jpg, DIR -> photos/ after --index, search/ after --out;
* a fresh `train --out RUN` (no --resume) -> runs/new_<doc>_<line>, and a `train` line repeated in
  a second doc (README.md and docs/loggers.md) -> its --out with `_2` (each doc is read on its own;
  the run refuses a folder that holds a run);
* environment words before the command (`OMP_NUM_THREADS=1 instdisc ...`) are kept, except
  `WANDB_MODE=online` -> offline (no network here; the same logger code, no upload).

A `--logger tensorboard` line runs without the `tensorboard` package here: the row says so (no
RUN/tb/, skipped as docs/loggers.md documents).

Commands that need what this machine does not have are not run and say why: released weights
files, a SLURM cluster, 8 GPUs / several nodes. tests/test_docs_commands.py runs the cheap part
(extraction + parsing) in the normal suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("instdisc", "torchrun", "srun")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")  # an environment assignment before the command


@dataclass
class DocCommand:
    file: str  # relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # as written (continuation lines joined), comment included
    launcher: list[str]  # what runs `instdisc`: ["instdisc"], ["torchrun", ..., "-m", "instdisc"], ["srun", "instdisc"]
    argv: list[str]  # the arguments after `instdisc` (argv[0] is the subcommand)
    env: list[str] = field(default_factory=list)  # `NAME=value` words before the launcher, as written
    notes: list[str] = field(default_factory=list)


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a fenced or an indented code block."""
    out, fenced, prev_blank = [], False, True
    indented = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append((i, line))
            continue
        if line.startswith("    ") and (prev_blank or indented) and not line.lstrip().startswith(("* ", "- ")):
            indented = True
            out.append((i, line[4:]))
        elif line.strip():
            indented = False
        prev_blank = not line.strip()
    return out


def _split(text: str) -> list[str] | None:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return None


def extract(paths: list[Path] = DOCS) -> list[DocCommand]:
    """Every command line that runs `instdisc` (directly, under torchrun or srun) in the code blocks."""
    cmds = []
    for path in paths:
        lines = _code_lines(path.read_text())
        j = 0
        while j < len(lines):
            num, line = lines[j]
            text = line.strip()
            while text.endswith("\\") and j + 1 < len(lines):  # a continued shell line
                j += 1
                text = text[:-1].rstrip() + " " + lines[j][1].strip()
            j += 1
            if text.startswith("$ "):
                text = text[2:]
            words = _split(text)
            env = []
            while words and ENV_WORD.match(words[0]):  # `WANDB_MODE=online instdisc ...`
                env.append(words.pop(0))
            if not words or words[0] not in LAUNCHERS:
                continue
            if words[0] == "instdisc":
                launcher, argv = ["instdisc"], words[1:]
            elif words[0] == "torchrun":
                if "instdisc" not in words or words[words.index("instdisc") - 1] != "-m":
                    continue
                k = words.index("instdisc")
                launcher, argv = words[: k + 1], words[k + 1 :]
            else:  # srun instdisc ...
                if len(words) < 2 or words[1] != "instdisc":
                    continue
                launcher, argv = words[:2], words[2:]
            if not argv:
                continue
            name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            cmds.append(DocCommand(name, num, text, launcher, argv, env))
    return cmds


def normalise(argv: list[str]) -> list[str]:
    """The doc's shorthand made literal: an optional part `[--full]` or `[--index DIR]` is given,
    of alternatives `IMG|DIR` the first, `...` dropped (PATH after a flag that needs a value)."""
    out: list[str] = []
    for a in argv:
        if a == "...":
            if out and out[-1].startswith("--"):
                out.append("PATH")
            continue
        if a.startswith("[") and len(a) > 1:
            a = a[1:]
        if a.endswith("]") and len(a) > 1:
            a = a[:-1]
        if "|" in a and not a.startswith("-"):
            a = a.split("|", 1)[0]
        out.append(a)
    return out


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_parses(argv: list[str]) -> str | None:
    """None when the real parser accepts `instdisc ARGV` (for `train`: the method's own parser and
    the configuration's range checks, which need no data), else its error message."""
    import contextlib
    import io

    from instdisc.cli import _train_parser, build_parser
    from instdisc.config import load_preset
    from instdisc.errors import UserError
    from instdisc.methods import resolve_config

    argv = normalise(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "train":
                rest = argv[1:]
                config = _flag(rest, "--config")
                preset = load_preset(ROOT / config) if config and (ROOT / config).is_file() else {}
                method = _flag(rest, "--method") or preset.get("method") or "npid"
                args = _train_parser(method).parse_args(rest)
                flags = {k: v for k, v in vars(args).items() if "." in k}
                resolve_config(preset, flags, method)
            else:
                build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        return err.getvalue().strip() or f"exit status {e.code}"
    except UserError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- running

NEEDS = [  # (pattern on the command as written, why it is not run here)
    (r"^srun ", "needs a SLURM cluster (docs/slurm.md)"),
    (r"--nproc_per_node[ =]8|--nnodes", "needs 8 GPUs / several nodes"),
    (r"lemniscate_resnet50\.pth", "needs the released NPID weights file (docs/evaluation.md, released weights)"),
]
PLACEHOLDER_RUNS = {"RUN", "RUN_DIR"}
DIGITS_TRAIN = 1437  # images in digits' training split


def digits_sizes(argv: list[str]) -> list[tuple[str, str, str]]:
    """(flag, value, note) for each size a training command sets for a larger set than digits
    (e.g. a CIFAR-10 preset's --nce-k 4096): the value the method chooses itself for 1,437 images
    (`fill_defaults`), as it would with the flag left out."""
    from instdisc.cli import _train_parser
    from instdisc.config import load_preset
    from instdisc.methods import resolve_config

    rest = argv[1:]
    config = _flag(rest, "--config")
    preset = load_preset(ROOT / config) if config and (ROOT / config).is_file() else {}
    method = _flag(rest, "--method") or preset.get("method") or "npid"
    args = _train_parser(method).parse_args(rest)
    cfg = resolve_config(preset, {k: v for k, v in vars(args).items() if "." in k}, method)
    out = []
    m = cfg.method
    for name in ("nce_k", "queue_size"):  # refused at N or more (MoCo's queue is not: stale keys, no error)
        given = getattr(m, name, None)
        if given is None or given < DIGITS_TRAIN:
            continue
        setattr(m, name, None)
        fill = getattr(m, "fill_defaults", None)
        if fill is not None:
            fill(DIGITS_TRAIN, 10)
        new = getattr(m, name)
        if new is None:  # no rule of the method's own: the largest power of two <= N / 2 (MoCo's queue rule)
            new = 1 << ((DIGITS_TRAIN // 2).bit_length() - 1)
        flag = "--" + name.replace("_", "-")
        out.append((flag, str(new), f"{flag} {given} -> {new} (sized for more than {DIGITS_TRAIN:,} images)"))
    d = cfg.data
    if d.sampler == "sliding" and d.window > DIGITS_TRAIN:
        w = DIGITS_TRAIN // 10
        out.append(("--window", str(w), f"--window {d.window} -> {w} (N // 10)"))
        out.append(("--stride", str(max(w // 8, 1)), f"--stride {d.stride} -> {max(w // 8, 1)}"))
    return out


def _digits_image(d, i: int):  # noqa: ANN001, ANN202
    """Digits image i (8 x 8, 0..16) as a 32 x 32 RGB PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8), "L").convert("RGB").resize((32, 32))


def make_imagefolder(dst: Path, per_class: int = 8) -> Path:
    """A small ImageFolder (train/ and test/, one folder per digit) written from digits."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, offset in (("train", 0), ("test", 1000)):
        for c in range(10):
            folder = dst / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.where(d.target == c)[0][offset // 100 : offset // 100 + per_class]
            for i in idx:
                _digits_image(d, i).save(folder / f"{i}.png")
    return dst


SEARCH_QUERY, SEARCH_QUERIES, SEARCH_INDEX = "photo.jpg", "queries", "photos"  # written by make_search_images
SEARCH_INDEX_SIZE = 100  # > the docs' -k 20


def make_search_images(work: Path) -> None:
    """`instdisc search`'s inputs, written from digits into WORK: photo.jpg (one image, JPEG),
    queries/ (10 images, one per digit, no class folders) and photos/ (100 other images, no class
    folders: an unlabelled index)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    _digits_image(d, len(d.images) - 1).save(work / SEARCH_QUERY, quality=95)
    (work / SEARCH_QUERIES).mkdir()
    for c in range(10):
        i = int(np.where(d.target == c)[0][-2])
        _digits_image(d, i).save(work / SEARCH_QUERIES / f"{c}_{i}.png")
    (work / SEARCH_INDEX).mkdir()
    for i in range(SEARCH_INDEX_SIZE):
        _digits_image(d, i).save(work / SEARCH_INDEX / f"{i:04d}.png")


SEARCH_SUBS = {  # (the flag before it, the word as written) -> (what runs, the note)
    ("--query", "photo.jpg"): (SEARCH_QUERY, "photo.jpg: a digits image (JPEG)"),
    ("--query", "IMG"): (SEARCH_QUERY, "IMG -> photo.jpg, a digits image (JPEG)"),
    ("--query", "queries/"): (SEARCH_QUERIES + "/", "queries/: 10 digits images, no class folders"),
    ("--query", "DIR"): (SEARCH_QUERIES + "/", "DIR -> queries/, 10 digits images"),
    ("--index", "~/photos"): (SEARCH_INDEX, f"~/photos -> {SEARCH_INDEX}/, {SEARCH_INDEX_SIZE} digits images, unlabelled"),
    ("--index", "~/holiday-photos"): (
        SEARCH_INDEX, f"~/holiday-photos -> {SEARCH_INDEX}/, {SEARCH_INDEX_SIZE} digits images, unlabelled"),
    ("--index", "DIR"): (SEARCH_INDEX, f"--index DIR -> {SEARCH_INDEX}/, {SEARCH_INDEX_SIZE} digits images, unlabelled"),
    ("--out", "DIR"): ("search/", "--out DIR -> search/"),
}
ENV_SUBS = {"WANDB_MODE=online": ("WANDB_MODE=offline", "WANDB_MODE=online -> offline (no network here)")}


def command_env(cmd: DocCommand) -> tuple[dict[str, str], list[str]]:
    """The environment assignments written before the command ({NAME: value}) and the notes of
    those changed here."""
    env, notes = {}, []
    for word in cmd.env:
        if word in ENV_SUBS:
            word, note = ENV_SUBS[word]
            notes.append(note)
        name, value = word.split("=", 1)
        env[name] = value
    return env, notes


def plan(cmd: DocCommand, made: set[str] | None = None) -> tuple[list[str] | None, list[str]]:
    """(argv to run after the launcher, or None when it cannot run here; the substitutions made
    or the reason it is not run). `made`: the run folders earlier commands trained (updated here),
    so that a `train` repeated in a second doc trains into a new folder."""
    import importlib.util

    from instdisc.config import load_preset

    for pat, why in NEEDS:
        if re.search(pat, cmd.text):
            return None, [why]
    argv = normalise(cmd.argv)
    _, notes = command_env(cmd)
    out: list[str] = []
    fresh_train = argv[0] == "train" and "--resume" not in argv
    i = 0
    while i < len(argv):
        a = argv[i]
        prev = argv[i - 1] if i else ""
        if a == "--data" and i + 1 < len(argv):
            if argv[i + 1] != "digits":
                notes.append(f"--data {argv[i + 1]} -> digits")
            out += ["--data", "digits"]
            i += 2
            continue
        if argv[0] == "search" and (prev, a) in SEARCH_SUBS:
            a, note = SEARCH_SUBS[prev, a]
            notes.append(note)
        elif a in PLACEHOLDER_RUNS and fresh_train and prev == "--out":  # a new run, not the one RUN names
            a = f"runs/new_{Path(cmd.file).stem}_{cmd.line}"
            notes.append(f"{argv[i]} -> {a} (a new run)")
        elif a in PLACEHOLDER_RUNS:
            a = "runs/digits"
            notes.append(f"{argv[i]} -> runs/digits")
        elif a == "runs/bench_npid_cifar10_cpu":  # benchmarks/npid_cifar10_cpu.sh's run: the README's runs/c10cpu
            a = "runs/c10cpu"
            notes.append(f"{argv[i]} -> runs/c10cpu (the same preset's run)")
        elif a == "C.yaml":
            a = "configs/npid_digits.yaml"
            notes.append("C.yaml -> configs/npid_digits.yaml")
        elif argv[0] == "data" and a in ("PATH", "~/imagenet"):
            a = "imagefolder"
            notes.append(f"{argv[i]} -> a small ImageFolder of digits")
        elif argv[0] == "data" and a == "~/imagenet-320":
            a = "imagefolder-320"
        out.append(a)
        i += 1
    if out[0] == "train":
        config = _flag(out, "--config")
        preset = load_preset(ROOT / config) if config and (ROOT / config).is_file() else {}
        if "data" not in preset and _flag(out, "--data") is None and "--resume" not in out:
            out += ["--data", "digits"]
            notes.append("+ --data digits")
        epochs = _flag(out, "--epochs")
        epochs = int(epochs) if epochs is not None else int(preset.get("epochs", 200))
        if epochs > 10 and config != "configs/npid_digits.yaml" and "--resume" not in out:
            out += ["--epochs", "1"]
            notes.append(f"epochs {epochs} -> 1")
        if "--resume" not in out:
            for flag, value, note in digits_sizes(out):
                out += [flag, value]
                notes.append(note)
        run_dir = _flag(out, "--out")
        if made is not None and run_dir is not None and "--resume" not in out:
            if run_dir in made:  # the same line in a second doc: each doc is read on its own
                k = out.index("--out")
                n = 2
                while f"{run_dir}_{n}" in made:
                    n += 1
                out[k + 1] = f"{run_dir}_{n}"
                notes.append(f"--out {run_dir} -> {out[k + 1]} (an earlier line trained {run_dir})")
            made.add(out[out.index("--out") + 1])
        loggers = out[out.index("--logger") + 1:] if "--logger" in out else []
        if "tensorboard" in loggers[: next((j for j, w in enumerate(loggers) if w.startswith("-")), None)] \
                and importlib.util.find_spec("tensorboard") is None:
            notes.append("tensorboard not installed here: no RUN/tb/ (skipped, docs/loggers.md)")
    if out[0] == "linear" and "--augmented" in out and _flag(out, "--epochs") not in (None, "1", "2"):
        k = out.index("--epochs")
        notes.append(f"--epochs {out[k + 1]} -> 2")
        out[k + 1] = "2"
    return out, notes


LOGGER_DIRS = {"tensorboard": "tb", "wandb": "wandb", "mlflow": "mlruns"}  # where each --logger writes in RUN


def logger_outputs(work: Path, argv: list[str]) -> str:
    """For a `train --logger ...`: which logger folders the run holds afterwards ("" otherwise)."""
    if argv[0] != "train" or "--logger" not in argv or _flag(argv, "--out") is None:
        return ""
    run = work / str(_flag(argv, "--out"))
    held = [f"{d}/" for d in LOGGER_DIRS.values() if (run / d).is_dir() and any((run / d).iterdir())]
    return "; RUN holds " + (", ".join(held) if held else "no logger folder")


def headline(stdout: str, command: str = "") -> str:
    """The last number the command printed with a %, or its last line (`search`: its summary line)."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if command == "search":
        summary = [ln for ln in lines if re.match(r"\d+ quer", ln)]
        if summary:
            return summary[-1][:120]
    for ln in reversed(lines):
        m = re.search(r"top-1[^0-9]*([0-9.]+)\s*%", ln) or re.search(r"([0-9.]+)\s*%", ln)
        if m:
            return ln[:120]
    return lines[-1][:120] if lines else ""


def run_all(cmds: list[DocCommand], timeout: float) -> list[dict]:
    venv = Path(sys.executable).parent
    results = []
    with tempfile.TemporaryDirectory(prefix="docs-commands-") as tmp:
        work = Path(tmp)
        (work / "configs").symlink_to(ROOT / "configs")
        make_imagefolder(work / "imagefolder")
        make_search_images(work)
        base_env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}"}
        made: set[str] = set()
        for cmd in cmds:
            argv, notes = plan(cmd, made)
            cmd_env, _ = command_env(cmd)
            env = {**base_env, **cmd_env}
            row = {"file": cmd.file, "line": cmd.line, "command": cmd.text, "notes": notes}
            if argv is None:
                results.append({**row, "status": "not run", "seconds": None, "headline": ""})
                print(f"[skip] {cmd.text}  ({'; '.join(notes)})", flush=True)
                continue
            launcher = cmd.launcher
            if launcher[0] == "torchrun":
                launcher = [str(venv / "torchrun"), *launcher[1:]]
            else:
                launcher = [str(venv / "instdisc")]
            t0 = time.perf_counter()
            try:
                p = subprocess.run([*launcher, *argv], cwd=work, env=env, capture_output=True, text=True,
                                   timeout=timeout)
                status, out, err = p.returncode, p.stdout, p.stderr
            except subprocess.TimeoutExpired as e:
                status, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "")
            secs = time.perf_counter() - t0
            row.update(status=status, seconds=round(secs, 1), headline=headline(out.replace(f"{work}{os.sep}", ""), argv[0]) + logger_outputs(work, argv),
                       ran=shlex.join([*(f"{k}={v}" for k, v in cmd_env.items()), *cmd.launcher, *argv]))
            if status != 0:
                row["error"] = (err.strip().splitlines() or [""])[-1][:300]
            results.append(row)
            print(f"[{status}] {secs:6.1f}s {row['ran']}\n         {row['headline'] or row.get('error', '')}", flush=True)
    return results


def markdown(results: list[dict]) -> str:
    rows = ["| # | doc | command as written | changed for digits | exit | s | headline |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in enumerate(results, 1):
        def cell(s: object) -> str:
            return str(s).replace("|", "\\|")

        cmd = r["command"].split(" #")[0].strip()
        rows.append(f"| {n} | {r['file']}:{r['line']} | `{cell(cmd)}` | {cell('; '.join(r['notes']))} | "
                    f"{r['status']} | {'' if r['seconds'] is None else r['seconds']} | "
                    f"{cell(r.get('headline') or r.get('error', ''))} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="run the commands (else only check that they parse)")
    ap.add_argument("--only", default=None, help="regular expression: run only commands matching it")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per command")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    args = ap.parse_args()
    cmds = extract()
    bad = [(c, e) for c in cmds if (e := check_parses(c.argv))]
    for c, e in bad:
        print(f"{c.file}:{c.line}: {c.text}\n    {e}")
    print(f"{len(cmds)} commands, {len(bad)} do not parse")
    if not args.run:
        return 1 if bad else 0
    if args.only:
        cmds = [c for c in cmds if re.search(args.only, c.text)]
    results = run_all(cmds, args.timeout)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    table = markdown(results)
    if args.md:
        Path(args.md).write_text(table)
    print(table)
    return 1 if any(r["status"] not in (0, "not run") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
