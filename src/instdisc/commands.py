"""The evaluation and utility subcommands: each reads its parsed arguments, calls the library
and prints. Their flags are defined in cli.py (`build_parser`); training is `cli.cmd_train`.
Imports are inside the functions, so that `instdisc --help` does not load torch.
"""

from __future__ import annotations

import argparse
import os

from instdisc.errors import UserError

LINEAR_LRS = (0.001, 0.01, 0.1, 1.0)  # the cached-feature probe's grid (docs/evaluation.md)
AUGMENTED_LR = 0.1  # the augmented probe's one lr (docs/evaluation.md)
EMBED_BATCH = 256  # images per forward pass when embedding


def _save_image(img, path: str) -> None:  # noqa: ANN001
    try:
        img.save(path)
    except OSError as e:
        raise UserError(f"--out: cannot write {path!r}: {e.strerror or e}.") from None


def cmd_embed(args: argparse.Namespace) -> int:
    from instdisc.checkpoint import check_out_file
    from instdisc.evaluate import extract, load_subject, open_images
    from instdisc.features import save_features

    check_out_file(args.out)
    subject = load_subject(args.run, device=args.device, published_ok=False)
    images = open_images(subject, args.data, args.split, cache_dir=args.cache_dir,
                         drop_unknown=args.drop_unknown_classes, progress=True)
    feats = extract(subject, images, "embedding", batch_size=args.batch_size, progress=True)
    meta = {"source": images.name, "split": args.split, "checkpoint": str(args.run),
            "method": subject.config.get("run", {}).get("method"), "classes": images.classes}
    if images.meta.get("dropped_unknown"):
        meta["dropped_unknown"] = images.meta["dropped_unknown"]
    for p in save_features(args.out, feats, images.labels, meta, paths=images.paths()):
        print(f"wrote {p}")
    return 0


def _features(args: argparse.Namespace, kind: str):
    """The run's (or the files') train/test features. ``kind``: the command's default --features;
    the kind used is written back to ``args.features`` where the command has that flag."""
    from instdisc.evaluate import features_for

    asked = getattr(args, "features", None)
    files = bool(args.train or args.test)
    if files:  # evaluated as they are: a flag that only applies to a run would change nothing
        given = [flag for flag, on in (("--data", args.data is not None), ("--layout", args.layout is not None),
                                       ("--features backbone", asked == "backbone"),
                                       ("--drop-unknown-classes", args.drop_unknown_classes),
                                       ("--batch-size", args.batch_size is not None),
                                       ("--cache-dir", args.cache_dir is not None), ("--no-cache", args.no_cache),
                                       # the files are read to the CPU and evaluated there
                                       (f"--device {args.device}", args.device not in ("auto", "cpu"))) if on]
        if given:
            raise UserError(f"{', '.join(given)}: {'applies' if len(given) == 1 else 'apply'} to a run, not to feature "
                            "files (--train/--test hold `instdisc embed`'s embedding and are evaluated as they are); "
                            "give the run directory instead, or leave the flag out.")
    kind = "embedding" if files else asked or kind  # files hold what `embed` writes
    if hasattr(args, "features"):
        args.features = kind
    return features_for(
        args.run, train=args.train, test=args.test, data=args.data, kind=kind, device=args.device,
        layout=args.layout, batch_size=args.batch_size or EMBED_BATCH, cache_dir=args.cache_dir, use_cache=not args.no_cache,
        drop_unknown=args.drop_unknown_classes, progress=True,
    )


def cmd_knn(args: argparse.Namespace) -> int:
    from instdisc.evaluate import format_table, knn_row, knn_table, save_result

    ev = _features(args, "embedding")
    rows = knn_table(ev.train_x, ev.train_y, ev.test_x, ev.test_y, ks=args.k, ts=args.t,
                     num_classes=ev.num_classes, backend=args.backend)
    print(format_table(rows, ["k", "t", "top1", "top5"]))
    save_result(ev.save_dir, "knn" if args.features == "embedding" else f"knn_{args.features}",
                {"features": args.features, "rows": rows})
    print(f"{knn_row(rows, args.k[-1], args.t[-1])['top1']:.2f}")
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    from instdisc.evaluate import (
        linear_probe,
        linear_probe_augmented,
        load_subject,
        open_eval_sets,
        save_result,
    )

    if args.augmented:
        if not args.run:
            raise UserError("--augmented trains through the backbone: give a run directory or checkpoint.")
        if args.features == "embedding":
            raise UserError("--augmented trains a classifier on the backbone's pooled features; --features "
                            "embedding does not apply (leave it out).")
        subject = load_subject(args.run, device=args.device, layout=args.layout)
        tr, te = open_eval_sets(subject, args.data, cache_dir=args.cache_dir,
                                drop_unknown=args.drop_unknown_classes, progress=True)
        if args.norm == "none":
            raise UserError("--augmented supports --norm bn or l2 (a BatchNorm or unit rows before the classifier).")
        if args.lr is not None and len(args.lr) > 1:
            raise UserError("--augmented trains one classifier (no held-out grid search): give one --lr "
                            f"(default {AUGMENTED_LR:g}); got {' '.join(f'{v:g}' for v in args.lr)}.")
        res = linear_probe_augmented(subject, tr, te, norm=args.norm,
                                     lr=args.lr[0] if args.lr else AUGMENTED_LR, epochs=args.epochs, batch_size=args.probe_batch_size,
                                     weight_decay=args.weight_decay, seed=args.seed, progress=True)
        save_dir = subject.run_dir / "eval" if subject.run_dir is not None else None
        name = "linear_augmented"
    else:
        ev = _features(args, "backbone")
        res = linear_probe(ev.train_x, ev.train_y, ev.test_x, ev.test_y, num_classes=ev.num_classes,
                           norm=args.norm, lrs=args.lr or LINEAR_LRS, epochs=args.epochs, batch_size=args.probe_batch_size,
                           weight_decay=args.weight_decay, seed=args.seed, progress=True)
        save_dir, name = ev.save_dir, "linear" if args.features == "backbone" else f"linear_{args.features}"
    save_result(save_dir, name, {"features": "backbone" if args.augmented else args.features, **res})
    print(f"linear probe ({res['norm']} inputs, lr {res['lr']:g}, {res['epochs']} epochs, {res['time_s']:.1f} s): "
          f"top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}%")
    print(f"{res['top1']:.2f}")
    return 0


def cmd_lowshot(args: argparse.Namespace) -> int:
    from instdisc.evaluate import low_shot, save_result

    ev = _features(args, "backbone")
    rows = low_shot(ev.train_x, ev.train_y, ev.test_x, ev.test_y, shots=args.shots, draws=args.draws,
                    classifier=args.classifier, C=args.C, norm=args.norm, seed=args.seed, progress=True)
    if all("mean" not in r for r in rows):  # nothing measured: a refusal, not a result
        raise UserError(f"every --shots value is too large: {rows[0]['skipped']}.")
    save_result(ev.save_dir, "lowshot", {"features": args.features, "classifier": args.classifier, "C": args.C,
                                         "draws": args.draws, "rows": rows})
    for r in rows:
        print(f"k={r['k']:>3}: " + (f"{r['mean']:.2f} +- {r['std']:.2f} ({len(r['runs'])} draws)"
                                    if "mean" in r else f"skipped ({r['skipped']})"))
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from instdisc.evaluate import format_table, save_result, split_stages, stage_table

    ev = _features(args, "stages")
    rows = stage_table(split_stages(ev.train_x, ev.stage_dims), ev.train_y, split_stages(ev.test_x, ev.stage_dims),
                       ev.test_y, num_classes=ev.num_classes, knn_k=args.knn_k, knn_t=args.knn_t,
                       epochs=args.epochs, norm=args.norm, lrs=args.lr, seed=args.seed, progress=True)
    save_result(ev.save_dir, "stages", {"rows": rows})
    print(format_table(rows, ["stage", "dim", "linear_top1", "linear_top5", "knn_top1"]))
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    from instdisc.checkpoint import check_out_file
    from instdisc.report import neighbour_figure

    check_out_file(args.out)
    ev = _features(args, "embedding")
    img, caption = neighbour_figure(ev, queries=args.queries, k=args.k, seed=args.seed, indices=args.ids)
    _save_image(img, args.out)
    print(caption)
    print(f"wrote {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from instdisc.search import check_out_dir, search, write_results

    check_out_dir(args.out)
    res = search(args.run, args.query, index=args.index, k=args.k, backend=args.backend, device=args.device,
                 batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=True)
    nq = len(res.query_names)
    print(f"{nq} {'query' if nq == 1 else 'queries'}, {res.indices.shape[1]} nearest of {len(res.index)} index images "
          f"({res.index.name}; index features {'from the cache' if res.cached else 'computed'})")
    for p in write_results(res, args.out):
        print(f"wrote {p}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from instdisc.checkpoint import check_out_file
    from instdisc.report import map_figure

    check_out_file(args.out)
    ev = _features(args, "embedding")
    img, caption = map_figure(ev.test_x, ev.test_y, ev.classes, method=args.method, max_points=args.max_points,
                              seed=args.seed, progress=True)
    _save_image(img, args.out)
    print(caption)
    print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from instdisc.report import build_report

    path = build_report(args.run, data=args.data, device=args.device, queries=args.queries, k=args.k,
                        map_method=args.map, full=args.full, seed=args.seed, batch_size=args.batch_size,
                        cache_dir=args.cache_dir, drop_unknown=args.drop_unknown_classes, progress=True,
                        out=args.out)
    print(f"wrote {path}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from instdisc.published import convert, read_weights

    print(convert(read_weights(args.path), args.layout).summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from instdisc.export import card_path, export_model

    card = export_model(args.run, args.format, args.out, part=args.part, layout=args.layout)
    print(f"wrote {args.out} ({card['format']}, {card['arch']} {card['part']}, {card['feature_dim']}-d output)")
    if "check" in card:
        print(f"  {card['check']['runtime']} vs instdisc: max |difference| {card['check']['max_abs_diff']:.1e}")
    for n in card["notes"]:
        print(f"  note: {n}")
    print(f"wrote {card_path(args.out, '.json')} and {card_path(args.out, '.md')}")
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    from instdisc.evaluate.clusters import run_clusters

    recs = run_clusters(args.run, data=args.data, heads=args.head, clusters=args.top, per_cluster=args.per_cluster,
                        cache_dir=args.cache_dir, progress=True)
    for r in recs:
        scores = " ".join(f"{k} {r[k]:.4f}" for k in ("nmi", "ari", "purity", "acc") if k in r)
        print(f"head {r['head']}: {r['used']}/{r['clusters']} clusters used {scores}".rstrip())
        print(f"  wrote {r['labels']} and {r['grid']}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from instdisc.datacheck import check_source

    report = check_source(args.path, progress=True)
    print(report.format())
    return 0 if report.ok() else 1


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from instdisc.prepare import prepare

    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    report = prepare(args.src, args.dst, max_side=args.max_side, quality=args.quality, workers=workers,
                     progress=True)
    print(report.format())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from instdisc.demo import run_demo

    res = run_demo(out=args.out, epochs=args.epochs, overwrite=args.overwrite)
    # stopped by a signal (checkpoint written): not a finished demo, so not status 0 (as `train`)
    if "signal" not in res:
        return 0
    return 128 + int(res["signal"]) if res["signal"] else 1
