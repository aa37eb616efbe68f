"""Command line: wiring only, no maths. The flags of every subcommand are here (`build_parser`,
`_train_parser`) with training (`cmd_train`); the other subcommands' bodies are in commands.py.

  instdisc train --method npid --data SOURCE --out RUN_DIR [--config FILE] [--epochs N] [--resume [auto]]
  instdisc embed RUN_DIR_OR_CHECKPOINT --data SOURCE --split train|test --out FILE.npy
  instdisc knn|linear|lowshot RUN_DIR_OR_CHECKPOINT | --train FILE.npy --test FILE.npy
  instdisc stages|neighbours|map RUN_DIR_OR_CHECKPOINT    (also released weights: instdisc weights FILE)
  instdisc search RUN_DIR --query IMG|DIR [--index DATA] [-k 20] --out DIR   (HTML page + CSV of retrievals)
  instdisc report RUN_DIR
  instdisc export RUN_DIR_OR_WEIGHTS --format torchvision|timm|detectron2|safetensors|onnx|torch-export --out FILE
  instdisc clusters RUN_DIR                               (SeLa: pseudo-label metrics, files, grid)
  instdisc data check PATH
  instdisc data prepare SRC DST --max-side N              (a smaller copy, same indices and labels)
  instdisc demo
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from instdisc.commands import (
    AUGMENTED_LR,
    EMBED_BATCH,
    LINEAR_LRS,
    cmd_clusters,
    cmd_data_check,
    cmd_data_prepare,
    cmd_demo,
    cmd_embed,
    cmd_export,
    cmd_knn,
    cmd_linear,
    cmd_lowshot,
    cmd_map,
    cmd_neighbours,
    cmd_report,
    cmd_search,
    cmd_stages,
    cmd_weights,
)
from instdisc.errors import InstdiscWarning, PeerError, UserError

BATCH_HELP = f"images per forward pass when embedding (default {EMBED_BATCH})"
DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N (default auto)"
CACHE_HELP = "decoded-image cache (default $INSTDISC_CACHE or ~/.cache/instdisc)"
SEED_HELP = "seed of the random draws (default 0)"

SOURCES_HELP = (
    "digits (scikit-learn's bundled handwritten digits), synthetic[:N], cifar10, cifar100, a folder "
    "(ImageFolder with train/ and test/, CIFAR python batches, or PIC's train.zip + train_map.txt), "
    "or a .tar/.tar.gz/.zip archive of an ImageFolder tree"
)

DROP_HELP = ("leave out test images whose class the training split does not have (the count is printed); "
             "without it such a class is an error. Label ids always come from the training split's class names")

class Parser(argparse.ArgumentParser):
    """An argparse parser whose refusals are one line, like our other errors (no usage block:
    for `train` it would be forty lines above the one that matters)."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def _number(text: str, *, low: float, low_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < low or (value == low and not low_ok):
        raise argparse.ArgumentTypeError(f"must be {'>=' if low_ok else '>'} {low:g}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, temperatures, C)."""
    return _number(text, low=0.0, low_ok=False)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay)."""
    return _number(text, low=0.0, low_ok=True)


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(
            f"must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, got {text!r}"
        )
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (epochs, batch sizes, counts)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (indices)."""
    return _integer(text, 0)


def min2_int(text: str) -> int:
    """argparse type: a whole number >= 2 (points of a 2-D map)."""
    return _integer(text, 2)


def seed_int(text: str) -> int:
    """argparse type: a seed numpy and torch both accept."""
    from instdisc.config import SEED_MAX

    return _integer(text, 0, SEED_MAX)


def image_path(text: str) -> str:
    """argparse type: an output picture whose extension Pillow can write (.png, .jpg, ...)."""
    from PIL import Image

    Image.init()
    ext = os.path.splitext(text)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a picture file name Pillow can write; end it with .png")
    return text


def layout_name(text: str) -> str:
    """argparse type: a known layout of released weights (instdisc.published.LAYOUTS)."""
    from instdisc.published import LAYOUTS

    if text not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"unknown layout {text!r}; choose one of {', '.join(LAYOUTS)}")
    return text


def resume_mode(text: str) -> str:
    """argparse type of --resume's optional value: only "auto" (plain --resume needs none)."""
    if text != "auto":
        raise argparse.ArgumentTypeError(f"the only value --resume takes is auto; got {text!r}")
    return text


def _pre_parse(argv: Sequence[str]):  # noqa: ANN202
    """The method decides which flags exist, and may come from the config file or, on --resume,
    from the run itself: find it first. -> (method, config path, (TrainConfig, checkpoint) of the
    run to resume, or None). With ``--resume auto`` that run is None when this launch starts the run
    (`rundir.resume_auto` decides)."""
    from instdisc.config import RunConfig, load_preset
    from instdisc.rundir import read_resume, resume_auto

    # the train parser's name: its refusals (--resume banana) read as train's, under `python -m` too
    pre = Parser(prog="instdisc train", add_help=False)
    pre.add_argument("--method", dest="run.method", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", nargs="?", const=True, default=False, type=resume_mode)
    pre.add_argument("--out", dest="run.out", default=None)
    ns, _ = pre.parse_known_args(argv)
    preset = load_preset(ns.config) if ns.config else {}
    method = getattr(ns, "run.method") or preset.get("method")
    stored = None
    out = getattr(ns, "run.out") or preset.get("out") or RunConfig().out
    if ns.resume == "auto":
        resuming = resume_auto(Path(out).expanduser().resolve())
    else:
        resuming = bool(ns.resume)
    if resuming:
        stored = read_resume(out)  # (config, checkpoint): read once, handed on to fit
        method = method or stored[0].run.method  # the run's own method: --resume needs no --method
    return method or "npid", ns.config, stored


def _train_parser(method: str) -> argparse.ArgumentParser:
    from instdisc.config import add_train_arguments
    from instdisc.methods import METHODS, method_config

    p = Parser(
        prog="instdisc train",
        description=(
            f"Train a self-supervised model. Flags shown are those of --method {method}; "
            f"methods: {', '.join(METHODS)}. Precedence: defaults < --config file < flags. "
            f"--data: {SOURCES_HELP}. SIGTERM, Ctrl-C or SIGUSR1 (SLURM's --signal=USR1@90) finishes the step "
            "under way, writes a checkpoint and exits with 128 + the signal (143, 130, 138); --resume continues exactly."
        ),
    )
    p.add_argument("--config", help="flat YAML preset whose keys are these flag names (e.g. configs/npid_cifar10.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=resume_mode, metavar="auto",
                   help="continue the run in --out from its last checkpoint; --resume auto: continue it if --out "
                        "holds one, else start it (one command line for the first launch, a torchrun restart and a "
                        "scheduler requeue)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out instead of refusing")
    add_train_arguments(p, method, method_config(method))
    return p


def _dist_timeout(configured: float, *, given: bool) -> float:
    """--dist-timeout if given on the command line, else $INSTDISC_DIST_TIMEOUT, else the config's."""
    raw = os.environ.get("INSTDISC_DIST_TIMEOUT")
    if given or not raw:
        return configured
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"INSTDISC_DIST_TIMEOUT must be a positive number of seconds; got {raw!r}.")
    return value


def _is_peer_failure(e: RuntimeError) -> bool:
    """A collective failed because another rank died or stalled. Gloo reports it as a plain
    RuntimeError ("Connection reset by peer", "Timed out waiting 5000ms"), NCCL as a DistError."""
    from torch.distributed import DistError

    text = str(e)
    return isinstance(e, DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    )


def cmd_train(argv: Sequence[str]) -> int:
    from instdisc import dist
    from instdisc.config import absolute_paths, load_preset
    from instdisc.engine import fit
    from instdisc.loggers import check_loggers
    from instdisc.methods import resolve_config
    from instdisc.rundir import resume_config

    method, config_path, stored_run = _pre_parse(argv)
    from instdisc.methods import METHODS

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    args = _train_parser(method).parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k}
    preset = load_preset(config_path) if config_path else {}
    cfg = resolve_config(preset, flags, method)
    absolute_paths(cfg)  # stored resolved: the run is found again from any working directory
    auto = args.resume == "auto"
    if auto and args.overwrite:
        raise UserError("--resume auto and --overwrite contradict each other: --resume auto never replaces a run.")
    if args.resume and args.overwrite:  # else one of the two was silently ignored
        raise UserError("--resume and --overwrite contradict each other: one continues the run in --out, "
                        "the other replaces it. Give one.")
    # --resume auto starting the run: what a launch stopped before its first checkpoint left is replaced.
    resume, overwrite = (stored_run is not None, stored_run is None) if auto else (args.resume, args.overwrite)
    if resume:  # the run's own config wins, with what the fields let a resume change (config.resume_rules)
        cfg = resume_config(cfg, stored_run[0], flags)
    if "run.logger" in flags:  # typed now: TensorBoard asked for by name must exist (loggers.check_loggers)
        check_loggers(flags["run.logger"], asked=True)
    timeout = _dist_timeout(cfg.run.dist_timeout, given="run.dist_timeout" in flags)
    env = dist.init_from_env(cfg.run.device, timeout_s=timeout)
    ok = False
    try:
        metrics = fit(cfg, env, resume=resume, overwrite=overwrite, checkpoint=stored_run[1] if resume else None)
        ok = True
    except RuntimeError as e:
        if not (env.distributed and _is_peer_failure(e)):
            raise
        raise PeerError(
            f"another process of this distributed run failed or stopped responding ({str(e).splitlines()[0]}). "
            f"Each process waits at most {timeout:g} s (--dist-timeout) for the others. Look for the first error "
            "in the other processes' output; the last checkpoint is intact: fix the cause and continue with --resume."
        ) from None
    finally:
        dist.cleanup(wait_for_peers=ok, destroy=False)  # the process ends with dist.leave (main)
    if env.is_main:  # the command line, for the report's rerun command (report.record_command)
        from instdisc.report import record_command

        record_command(cfg.run.out, list(argv), world_size=env.world_size, resumed=resume)
        print(f"outputs: {cfg.run.out} (config.json, metrics.jsonl, checkpoints/)")
    # Stopped by SIGTERM/SIGINT/SIGUSR1 (checkpoint written): not a finished run, so not status 0.
    return 128 + metrics["signal"] if metrics.get("signal") else 0


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="instdisc",
        description="Self-supervised visual features by instance discrimination (NPID, PIC, SeLa; MoCo v2 and "
                    "SimCLR as baselines), their evaluation, and weights out to other tools.",
    )
    from instdisc import __version__

    p.add_argument("--version", action="version", version=f"instdisc {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("train", help="train a model (see `instdisc train --help`)", add_help=False)

    e = sub.add_parser("embed", help="export index-ordered features of a data split to FILE.npy",
                       description="Writes FILE.npy (N x D float32, row i = dataset index i), FILE.labels.npy "
                                   "(N int64, if the source has labels), FILE.paths.txt (row i's image file, if "
                                   "the source has files) and FILE.meta.json.")
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--data", help=f"source to embed (default: the run's training source): {SOURCES_HELP}")
    e.add_argument("--split", choices=["train", "test"], default="test", help="which split (default test)")
    e.add_argument("--out", required=True, help="output FILE.npy")
    e.add_argument("--batch-size", type=positive_int, default=EMBED_BATCH, help=BATCH_HELP)
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    e.add_argument("--drop-unknown-classes", action="store_true", help=DROP_HELP)
    e.set_defaults(func=cmd_embed)

    def features_args(q: argparse.ArgumentParser, *, files: bool = True, kind: str | None = None) -> None:
        q.add_argument("run", nargs="?", help="run directory, checkpoint, or released weights (see `instdisc weights`)")
        if files:
            q.add_argument("--train", help="exported training features FILE.npy (with FILE.labels.npy)")
            q.add_argument("--test", help="exported test features FILE.npy (with FILE.labels.npy)")
        q.set_defaults(train=None, test=None)
        if kind:
            q.add_argument("--features", choices=["embedding", "backbone"], default=None,  # None: kind (_features)
                           help=f"embedding (the method's normalised output) or backbone (pooled trunk) of a run "
                                f"(default {kind}; feature files are evaluated as they are)")
        q.add_argument("--data", help="source to evaluate on (default: the run's own: its training source's train "
                                      "split and the test split of its --test-data, if any; required for released weights)")
        q.add_argument("--layout", default=None, type=layout_name, help="layout of released weights (default: detected)")
        # default None: given with feature files, it is refused (_features), not ignored
        q.add_argument("--batch-size", type=positive_int, default=None, help=BATCH_HELP)
        q.add_argument("--device", default="auto", help=DEVICE_HELP)
        q.add_argument("--cache-dir", default=None, help=CACHE_HELP)
        q.add_argument("--no-cache", action="store_true", help="do not reuse or write RUN_DIR/eval/features")
        q.add_argument("--drop-unknown-classes", action="store_true", help=DROP_HELP)
        q.add_argument("--seed", type=seed_int, default=0, help=SEED_HELP)

    k = sub.add_parser("knn", help="weighted kNN sweep over k and t, of a run or of exported features",
                       description="Weighted kNN (NPID): top-k cosine neighbours vote with weights exp(s/t); every "
                                   "(k, t) pair comes from one neighbour search. Results of a run also go to "
                                   "RUN_DIR/eval/knn.json. The last line printed is the top-1 accuracy (percent) "
                                   "of the last k and t alone, for scripts.")
    features_args(k, kind="embedding")
    k.add_argument("-k", type=positive_int, nargs="+", default=[10, 20, 100, 200], help="neighbours (default 10 20 100 200)")
    k.add_argument("-t", type=positive_float, nargs="+", default=[0.07], help="temperatures of the weights (default 0.07)")
    k.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto",
                   help="neighbour search; auto = faiss (if installed) for banks of 2,000,000+ rows")
    k.set_defaults(func=cmd_knn)

    li = sub.add_parser("linear", help="linear probe on frozen features (top-1/top-5)",
                        description="Softmax regression on cached frozen features: SGD momentum 0.9, cosine "
                                    "schedule, batch 256, 100 epochs, zero init; the lr is picked from --lr on a "
                                    "held-out 10% of the training set, then retrained on all of it. --augmented "
                                    "instead trains on random crops + flips through the frozen backbone every "
                                    "epoch (slow; for GPUs). The last line is the top-1 alone.")
    features_args(li, kind="backbone")
    li.add_argument("--norm", choices=["bn", "l2", "none"], default="bn",
                    help="input normalisation: bn = standardise with training statistics, l2 = unit rows (default bn)")
    li.add_argument("--lr", type=positive_float, nargs="+", default=None,
                    help="learning rate(s): the grid the cached-feature probe picks from on a held-out 10%% "
                         f"(default {' '.join(f'{v:g}' for v in LINEAR_LRS)}), or the one lr of --augmented (there "
                         f"{AUGMENTED_LR:g})")
    li.add_argument("--epochs", type=positive_int, default=100, help="epochs of the classifier (default 100)")
    li.add_argument("--probe-batch-size", type=positive_int, default=256, help="batch of the classifier's SGD (default 256)")
    li.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="weight decay of the classifier (default 0)")
    li.add_argument("--augmented", action="store_true", help="train on augmented images through the backbone")
    li.set_defaults(func=cmd_linear)

    lo = sub.add_parser("lowshot", help="low-shot linear SVM / logistic regression, k = 1..96 images per class",
                        description="For each k, --draws seeded random draws of k training images per class, a "
                                    "linear classifier on L2-normalised frozen features; mean +- std top-1.")
    features_args(lo, kind="backbone")
    lo.add_argument("--shots", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 96], help="labelled training images per class, k (default 1 2 4 8 16 32 64 96)")
    lo.add_argument("--draws", type=positive_int, default=5, help="seeded random draws per k (default 5)")
    lo.add_argument("--classifier", choices=["svm", "logreg"], default="svm", help="linear SVM or logistic regression (default svm)")
    lo.add_argument("-C", type=positive_float, default=1.0, help="inverse regularisation of the classifier (default 1)")
    lo.add_argument("--norm", choices=["l2", "bn", "none"], default="l2", help="input normalisation of the features (default l2)")
    lo.set_defaults(func=cmd_lowshot)

    st = sub.add_parser("stages", help="linear probe and kNN on the pooled output of each ResNet stage")
    features_args(st, files=False)
    st.add_argument("--epochs", type=positive_int, default=100, help="epochs of each stage's linear probe (default 100)")
    st.add_argument("--norm", choices=["bn", "l2", "none"], default="bn", help="input normalisation of the probes (default bn)")
    st.add_argument("--lr", type=positive_float, nargs="+", default=list(LINEAR_LRS), help="learning rates the probes pick from on a held-out 10%% (default 0.001 0.01 0.1 1)")
    st.add_argument("--knn-k", type=positive_int, default=200, help="neighbours of the per-stage kNN (default 200)")
    st.add_argument("--knn-t", type=positive_float, default=0.07, help="temperature of the kNN weights exp(s/t) (default 0.07)")
    st.set_defaults(func=cmd_stages)

    nb = sub.add_parser("neighbours", aliases=["neighbors"], help="PNG grid: test queries and their nearest training images",
                        description="Each row: a test image (blue frame) then its -k nearest training images by "
                                    "cosine similarity of the embedding, framed green (same label) or red.")
    features_args(nb, files=False)
    nb.add_argument("--out", required=True, type=image_path, help="output picture (.png)")
    nb.add_argument("--ids", type=nonnegative_int, nargs="+", default=None, help="test indices to query (default: random)")
    nb.add_argument("--queries", type=positive_int, default=8, help="number of random queries (default 8)")
    nb.add_argument("-k", type=positive_int, default=20, help="neighbours per query (default 20)")
    nb.set_defaults(func=cmd_neighbours)

    se = sub.add_parser("search", help="the nearest index images of each query image: an HTML page and a CSV",
                        description="For each query image, its -k nearest images of the index by cosine similarity "
                                    "of the embedding. Writes DIR/index.html (thumbnails, file names, similarities; "
                                    "DIR/thumbs/ beside it, no network needed), DIR/results.csv (query, rank, index, "
                                    "file, similarity). The index's features are cached under RUN_DIR/eval/features, "
                                    "so a second search embeds only the queries. Folders may be unlabelled.")
    se.add_argument("run", help="run directory or checkpoint (or released weights, with --index)")
    se.add_argument("--query", required=True, help="an image file, or a folder (or archive) of images, with or "
                                                   "without class folders (with train/ and test/: its train/)")
    se.add_argument("--index", default=None, help="the images searched, any --data source (its train split), e.g. "
                                                  "an unlabelled folder of images (default: the run's training data)")
    se.add_argument("-k", type=positive_int, default=20, help="retrievals per query, at most the index's size "
                                                              "(default 20)")
    se.add_argument("--out", required=True, help="output folder (made if absent): index.html, results.csv, thumbs/")
    se.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto",
                    help="neighbour search: exact torch top-k, or faiss's exact index; auto = faiss (if installed) "
                         "for indexes of 2,000,000+ images")
    se.add_argument("--batch-size", type=positive_int, default=EMBED_BATCH, help=BATCH_HELP)
    se.add_argument("--device", default="auto", help=DEVICE_HELP)
    se.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    se.add_argument("--no-cache", action="store_true", help="do not reuse or write the index's features in "
                                                            "RUN_DIR/eval/features")
    se.set_defaults(func=cmd_search)

    mp = sub.add_parser("map", help="PNG: 2-D map (PCA or t-SNE) of the test embedding, coloured by label")
    features_args(mp, files=False)
    mp.add_argument("--out", required=True, type=image_path, help="output picture (.png)")
    mp.add_argument("--method", choices=["auto", "pca", "tsne"], default="auto",
                    help="auto (default: tsne up to 5,000 points, pca above), pca (fast) or tsne")
    mp.add_argument("--max-points", type=min2_int, default=2000, help="test images drawn (seeded) into the map (default 2000)")
    mp.set_defaults(func=cmd_map)

    rp = sub.add_parser("report", help="self-contained HTML report of a run (RUN_DIR/report.html)")
    rp.add_argument("run", help="run directory")
    rp.add_argument("--data", help="source to evaluate on (default: the run's own)")
    rp.add_argument("--out", default=None, help="output HTML (default RUN_DIR/report.html)")
    rp.add_argument("--full", action="store_true", help="also run linear probe, low-shot and per-stage protocols")
    rp.add_argument("--queries", type=positive_int, default=8, help="rows of the neighbour grid (default 8)")
    rp.add_argument("-k", type=positive_int, default=20, help="neighbours per row of the grid (default 20)")
    rp.add_argument("--map", choices=["auto", "pca", "tsne"], default="auto",
                    help="2-D map: auto (default: tsne up to 5,000 points, pca above), pca (fast) or tsne")
    rp.add_argument("--seed", type=seed_int, default=0, help=SEED_HELP)
    rp.add_argument("--batch-size", type=positive_int, default=EMBED_BATCH, help=BATCH_HELP)
    rp.add_argument("--device", default="auto", help=DEVICE_HELP)
    rp.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    rp.add_argument("--drop-unknown-classes", action="store_true", help=DROP_HELP)
    rp.set_defaults(func=cmd_report)

    w = sub.add_parser("weights", help="check released NPID/PIC/SeLa weights against our backbones",
                       description="Reads a released checkpoint, maps every key to instdisc's backbones and prints "
                                   "what it holds; fails listing the keys that do not map. Layouts:\n"
                                   "lemniscate, lemniscate-cifar, pic, sela, sela-v1, sela-alexnet (sela-v2: "
                                   "recognised). See docs/evaluation.md.")
    w.add_argument("path", help="checkpoint file")
    w.add_argument("--layout", default=None, type=layout_name, help="force a layout (default: detected)")
    w.set_defaults(func=cmd_weights)

    ex = sub.add_parser("export", help="write a run's (or released weights') backbone for torchvision, timm, "
                        "detectron2, safetensors, ONNX or torch.export, with a model card",
                        description="Writes FILE in the chosen format and FILE.card.json + FILE.card.md (method, "
                                    "architecture and stem, input size and mean/std, feature dimension, training "
                                    "data and epochs, the run's evaluation results). See docs/export.md.")
    ex.add_argument("run", help="run directory, checkpoint, or released weights (see `instdisc weights`)")
    ex.add_argument("--format", required=True, choices=["torchvision", "timm", "detectron2", "safetensors", "onnx",
                                                        "torch-export"],
                    help="layout of FILE: torchvision/timm state dict (.pth), detectron2 pickle (.pkl), safetensors, "
                         "ONNX graph or torch.export program (.pt2); docs/export.md says what loads each")
    ex.add_argument("--out", required=True, help="output file (.pth, .pkl, .safetensors, .onnx, .pt2)")
    ex.add_argument("--part", choices=["backbone", "backbone+head"], default="backbone",
                    help="pooled backbone features, or the projection head's output (default backbone)")
    ex.add_argument("--layout", default=None, type=layout_name, help="layout of released weights (default: detected)")
    ex.set_defaults(func=cmd_export)

    cl = sub.add_parser("clusters", help="a SeLa run's pseudo-labels: NMI/ARI/purity/accuracy, .npy per head, PNG grid",
                        description="Reads the run's last checkpoint; writes RUN_DIR/pseudo_labels/head{h}.npy "
                                    "(int64, row i = training image i) and RUN_DIR/clusters/head{h}.png (the purest "
                                    "clusters first, one row of sample images each).")
    cl.add_argument("run", help="SeLa run directory or checkpoint")
    cl.add_argument("--head", type=nonnegative_int, nargs="+", default=None, help="heads to report (default: all)")
    cl.add_argument("--top", type=positive_int, default=10, help="clusters (rows) in the grid (default 10)")
    cl.add_argument("--per-cluster", type=positive_int, default=10, help="images per row (default 10)")
    cl.add_argument("--data", help="training source (default: the run's own)")
    cl.add_argument("--cache-dir", default=None, help=CACHE_HELP)
    cl.set_defaults(func=cmd_clusters)

    d = sub.add_parser("data", help="data utilities (`instdisc data check PATH`)")
    d.set_defaults(func=lambda _args: _usage(d))  # `instdisc data` alone: data's usage (check overrides func)
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION")
    c = dsub.add_parser("check", help="decode every image and report unreadable/truncated/empty files and odd modes")
    c.add_argument("path", help=SOURCES_HELP)
    c.set_defaults(func=cmd_data_check)
    pr = dsub.add_parser("prepare", help="write a copy of an ImageFolder with every image at most --max-side px "
                         "(aspect ratio kept, same file names, so indices and labels are unchanged): faster to decode")
    pr.add_argument("src", help="an ImageFolder: a folder, or a .tar/.zip of one")
    pr.add_argument("dst", help="a new (or empty) folder for the copy")
    pr.add_argument("--max-side", type=int, required=True, help="longest side of the copied images, in pixels")
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality of the resized JPEGs (default 90)")
    pr.add_argument("--workers", type=nonnegative_int, default=None, help="processes that decode and encode (default: all cores)")
    pr.set_defaults(func=cmd_data_prepare)

    m = sub.add_parser("demo", help="offline demo: NPID on scikit-learn digits, learned vs random kNN (~3 min on CPU)")
    m.add_argument("--out", default="runs/demo",
                   help="run directory (default runs/demo); an earlier demo there is replaced, any other run refused")
    m.add_argument("--overwrite", action="store_true", help="replace whatever run --out holds")
    m.add_argument("--epochs", type=positive_int, default=None, help="override the demo's epochs")
    m.set_defaults(func=cmd_demo)
    p.set_defaults(_levels=(("cmd", sub.choices), ("data_cmd", dsub.choices)))
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that an unknown flag is refused by the subcommand it was given to, so the
    message points at that subcommand's --help (argparse refuses it in the top-level parser)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        owner = parser
        for dest, choices in getattr(args, "_levels", ()):
            owner = choices.get(getattr(args, dest, None) or "", owner)
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _tune_runtime() -> None:
    """Before torch loads: OpenMP threads that spin while waiting collapse 2-thread torch as soon
    as any other process is busy (a 250x slowdown was measured on a 2-core machine)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _formatwarning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Every warning as one line, like our errors: ours as they are, a library's with its category
    (never Python's default form with a source path and a line of code)."""
    text = " ".join(str(message).split())
    if issubclass(category, InstdiscWarning):
        return f"instdisc: warning: {text}\n"
    return f"instdisc: warning: {category.__name__}: {text}\n"


def _is_out_of_memory(e: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's OutOfMemoryError (CUDA), and the plain RuntimeError
    that torch's CPU allocator raises ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


# Failures of the machine rather than of the program: a message, not a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.EIO}


def main(argv: Sequence[str] | None = None) -> int:
    _tune_runtime()
    warnings.formatwarning = _formatwarning
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(argv)
    except SystemExit as e:
        if not _joined_process_group():
            raise
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a bug's traceback, then the status Python would give it
        if not _joined_process_group():
            raise
        traceback.print_exc()
        status = 1
    if _joined_process_group():
        # A process of a distributed run, its work done or failed: no interpreter teardown, whose
        # gloo destructors can abort it (SIGABRT) and hide this status (dist.leave).
        from instdisc import dist

        dist.leave(status)
    return status


def _joined_process_group() -> bool:
    d = sys.modules.get("instdisc.dist")  # never imported: torch never used, no process group
    return d is not None and d.joined()


def _dispatch(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        parser = build_parser()
        args = _parse(parser, argv)
        if not hasattr(args, "func"):
            parser.print_help()
            return 0 if not argv else 2
        return args.func(args)
    except UserError as e:  # PeerError included; main then leaves without the teardown (dist.leave)
        print(f"instdisc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("instdisc: interrupted; the last checkpoint is intact (continue with --resume).", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"instdisc: error: {e.strerror or e}{where}. Free some space or fix the permissions; a training "
              "run's last checkpoint is intact (continue it with --resume).", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only memory exhaustion is handled here; the rest re-raised
        if not _is_out_of_memory(e):
            raise
        print(f"instdisc: error: out of memory ({' '.join(str(e).split())[:200]}). A value asked for more memory "
              "than this machine has: lower --batch-size, --aug-size, --image-size or --width (or the data "
              "size); a training run's last checkpoint is intact (continue it with --resume).", file=sys.stderr)
        return 2
