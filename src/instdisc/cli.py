"""Command line: wiring only, no maths.

  instdisc train --method npid --data SOURCE --out RUN_DIR [--config FILE] [--epochs N] [--resume]
  instdisc embed RUN_DIR_OR_CHECKPOINT --data SOURCE --split train|test --out FILE.npy
  instdisc knn RUN_DIR_OR_CHECKPOINT | --train FILE.npy --test FILE.npy
  instdisc data check PATH
  instdisc demo
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from instdisc.errors import UserError

SOURCES_HELP = (
    "digits (scikit-learn's bundled handwritten digits), synthetic[:N], cifar10, cifar100, a folder "
    "(ImageFolder with train/ and test/, CIFAR python batches, or PIC's train.zip + train_map.txt), "
    "or a .tar/.tar.gz/.zip archive of an ImageFolder tree"
)


def _pre_parse(argv: Sequence[str]) -> tuple[str, str | None]:
    """The method decides which flags exist, and may come from the config file: find it first."""
    from instdisc.config import load_preset

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", dest="run.method", default=None)
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv)
    method = getattr(ns, "run.method")
    if method is None and ns.config:
        method = load_preset(ns.config).get("method")
    return method or "npid", ns.config


def _train_parser(method: str) -> argparse.ArgumentParser:
    from instdisc.config import add_train_arguments
    from instdisc.methods import METHODS

    p = argparse.ArgumentParser(
        prog="instdisc train",
        description=(
            f"Train a self-supervised model. Flags shown are those of --method {method}; "
            f"methods: {', '.join(METHODS)}. Precedence: defaults < --config file < flags. "
            f"--data: {SOURCES_HELP}."
        ),
    )
    p.add_argument("--config", help="flat YAML preset whose keys are these flag names (e.g. configs/npid_cifar10.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out instead of refusing")
    add_train_arguments(p, method)
    return p


def cmd_train(argv: Sequence[str]) -> int:
    from instdisc import dist
    from instdisc.checkpoint import load_checkpoint
    from instdisc.config import TrainConfig, load_preset, resolve
    from instdisc.engine import fit

    method, config_path = _pre_parse(argv)
    from instdisc.methods import METHODS

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    args = _train_parser(method).parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    preset = load_preset(config_path) if config_path else {}
    cfg = resolve(preset, flags, method)
    if args.resume:
        # The run's own config wins. Flags of this invocation only (device, progress, an early
        # stop) come from the command line; a few more may be changed on purpose (e.g. --epochs to
        # extend a run); anything that would change the maths is refused.
        stored = TrainConfig.from_dict(load_checkpoint(cfg.run.out)["config"])
        invocation = {"run.device", "run.progress", "run.max_steps", "data.workers", "data.cache_dir", "run.out"}
        changeable = {"optim.epochs", "run.log_every", "run.knn_every", "run.ckpt_every_steps"}
        current, saved = cfg.to_dict(), stored.to_dict()
        for dest in flags:
            sec, name = dest.split(".", 1)
            if dest not in invocation | changeable and current[sec][name] != saved[sec][name]:
                raise UserError(
                    f"--resume: {name} was {saved[sec][name]!r} in this run; it cannot change to "
                    f"{current[sec][name]!r}. Start a new run (another --out) instead."
                )
        for dest in invocation | (changeable & set(flags)):
            sec, name = dest.split(".", 1)
            setattr(getattr(stored, sec), name, getattr(getattr(cfg, sec), name))
        cfg = stored
    env = dist.init_from_env(cfg.run.device)
    ok = False
    try:
        fit(cfg, env, resume=args.resume, overwrite=args.overwrite)
        ok = True
    finally:
        dist.cleanup(wait_for_peers=ok)
    if env.is_main:
        print(f"outputs: {cfg.run.out} (config.json, metrics.jsonl, checkpoints/)")
    return 0


def _load_run(path: str, device: str):
    """Checkpoint -> (method in eval mode on device, its TrainConfig)."""
    import torch

    from instdisc.checkpoint import load_checkpoint
    from instdisc.config import TrainConfig
    from instdisc.engine import build_method
    from instdisc.errors import CheckpointError

    ck = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ck["config"])
    method = build_method(cfg, int(ck["num_samples"]))
    try:
        method.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path!r} does not match its own config: {str(e).splitlines()[0]}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return method.to(dev).eval(), cfg, dev


def _embed(method, cfg, dev, data: str, split: str, batch_size: int, cache_dir: str | None, progress: bool = True):
    from instdisc.features import extract_features
    from instdisc.sources import open_source

    images = open_source(data, split, cache_dir=cache_dir, image_size=cfg.data.image_size, progress=progress)
    a = cfg.aug
    feats = extract_features(
        method.embed, images, size=a.size, mean=a.mean, std=a.std, batch_size=batch_size, device=dev,
        workers=cfg.data.workers, desc=f"embed {split}", progress=progress,
    )
    return feats, images


def cmd_embed(args: argparse.Namespace) -> int:
    from instdisc.features import save_features

    method, cfg, dev = _load_run(args.run, args.device)
    data = args.data or cfg.data.data
    feats, images = _embed(method, cfg, dev, data, args.split, args.batch_size, args.cache_dir or cfg.data.cache_dir)
    meta = {"source": data, "split": args.split, "checkpoint": str(args.run), "method": cfg.run.method,
            "classes": images.classes}
    for p in save_features(args.out, feats, images.labels, meta):
        print(f"wrote {p}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    import torch

    from instdisc.features import load_features
    from instdisc.knn import knn_accuracy

    if args.run:
        method, cfg, dev = _load_run(args.run, args.device)
        data = args.data or cfg.data.data
        cache = args.cache_dir or cfg.data.cache_dir
        bank, tr = _embed(method, cfg, dev, data, "train", args.batch_size, cache)
        query, te = _embed(method, cfg, dev, data, "test", args.batch_size, cache)
        if tr.labels is None or te.labels is None:
            raise UserError(f"{data!r} has no labels: kNN accuracy needs labelled train and test splits.")
        bank_y, query_y = torch.from_numpy(tr.labels), torch.from_numpy(te.labels)
    else:
        if not (args.train and args.test):
            raise UserError("give a run directory / checkpoint, or both --train and --test feature files.")
        bank, bank_y = load_features(args.train)
        query, query_y = load_features(args.test)
        if bank_y is None or query_y is None:
            raise UserError("kNN accuracy needs FILE.labels.npy next to both feature files (written by `embed`).")
    res = {}
    for k in args.k:
        res[k] = knn_accuracy(query, query_y, bank, bank_y, k=k, t=args.t)
        print(f"weighted kNN k={k} t={args.t}: top-1 {res[k]['top1']:.2f}% top-5 {res[k]['top5']:.2f}%")
    print(f"{res[args.k[-1]]['top1']:.2f}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from instdisc.datacheck import check_source

    report = check_source(args.path, progress=True)
    print(report.format())
    return 0 if report.ok() else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from instdisc.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, overwrite=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="instdisc",
        description="Self-supervised visual features by instance discrimination (NPID), and their evaluation.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("train", help="train a model (see `instdisc train --help`)", add_help=False)

    e = sub.add_parser("embed", help="export index-ordered features of a data split to FILE.npy",
                       description="Writes FILE.npy (N x D float32, row i = dataset index i), FILE.labels.npy "
                                   "(N int64, if the source has labels) and FILE.meta.json.")
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--data", help=f"source to embed (default: the run's training source): {SOURCES_HELP}")
    e.add_argument("--split", choices=["train", "test"], default="test")
    e.add_argument("--out", required=True, help="output FILE.npy")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir", default=None)
    e.set_defaults(func=cmd_embed)

    k = sub.add_parser("knn", help="weighted kNN accuracy of a run or of exported features",
                       description="Weighted kNN (NPID): top-k cosine neighbours vote with weights exp(s/t). "
                                   "The last line printed is the top-1 accuracy (percent) alone, for scripts.")
    k.add_argument("run", nargs="?", help="run directory or checkpoint (embeds its train and test splits)")
    k.add_argument("--train", help="exported training features FILE.npy (with FILE.labels.npy)")
    k.add_argument("--test", help="exported test features FILE.npy (with FILE.labels.npy)")
    k.add_argument("--data", help="source for a run (default: the run's own)")
    k.add_argument("-k", type=int, nargs="+", default=[200], help="neighbours (default 200; several allowed)")
    k.add_argument("-t", type=float, default=0.07, help="temperature of the weights (default 0.07)")
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--device", default="auto")
    k.add_argument("--cache-dir", default=None)
    k.set_defaults(func=cmd_knn)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION")
    c = dsub.add_parser("check", help="decode every image and report unreadable/truncated/empty files and odd modes")
    c.add_argument("path", help=SOURCES_HELP)
    c.set_defaults(func=cmd_data_check)

    m = sub.add_parser("demo", help="offline demo: NPID on scikit-learn digits, learned vs random kNN (~3 min on CPU)")
    m.add_argument("--out", default="runs/demo", help="run directory (replaced if it exists)")
    m.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    m.set_defaults(func=cmd_demo)
    return p


def _tune_runtime() -> None:
    """Before torch loads: OpenMP threads that spin while waiting collapse 2-thread torch as soon
    as any other process is busy (a 250x slowdown was measured on a 2-core machine)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    _tune_runtime()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            parser.print_help()
            return 0 if not argv else 2
        return args.func(args)
    except UserError as e:
        print(f"instdisc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("instdisc: interrupted; the last checkpoint is intact (continue with --resume).", file=sys.stderr)
        return 130
