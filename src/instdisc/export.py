"""Trained weights out of instdisc, in the layouts other tools load, each with a model card.

`export_model(path, fmt, out, part=...)` reads a run, an instdisc checkpoint or released weights
(`evaluate.load_subject`, the one run loader) and writes one of:

* ``torchvision`` / ``timm``: a plain state dict (``.pth``) in torchvision's ResNet names
  (``conv1``, ``bn1``, ``layerL.B.convN``, ``layerL.B.downsample.{0,1}``, ``fc``), which
  ``torchvision.models.resnet18()`` and ``timm.create_model("resnet18", num_classes=0)`` load with
  ``strict=True`` (after ``model.fc = nn.Identity()`` for torchvision when only the backbone is
  exported). instdisc keeps its own module names (``stem.0``, ``shortcut``); `torchvision_key`
  is the one renaming table, the exact inverse of `published.resnet_key`, which maps released
  torchvision-layout weights in.
* ``detectron2``: the pickle detectron2's ResNet reads (``stem.conv1``, ``res2.0.conv1.norm``,
  ``res2.0.shortcut``...; numpy arrays under ``"model"``, ``"matching_heuristics": True``), as
  MoCo's detection converter writes it.
* ``safetensors``: the same tensors as ``torchvision`` (AlexNet: instdisc's names), with the model
  card's essentials in the file's metadata.
* ``onnx`` (opset `ONNX_OPSET`, dynamic batch) and ``torch-export`` (a ``torch.export`` program,
  ``.pt2``): a graph from normalised images ``(B, 3, S, S)`` to features ``(B, D)``; the export
  runs it (onnxruntime, ``torch.export.load``) against the instdisc module and records the largest
  difference in the card. ``torch.jit.script`` is not offered.

Every export writes ``FILE.card.json`` and ``FILE.card.md`` beside ``FILE``: method and paper,
architecture and stem, the eval transform (input size, mean, std), feature dimension, training data
and epochs, and the run's evaluation results with the commands that wrote them.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instdisc.errors import InstdiscWarning, UserError

FORMATS: dict[str, str] = {  # format -> usual file suffix
    "torchvision": ".pth",
    "timm": ".pth",
    "detectron2": ".pkl",
    "safetensors": ".safetensors",
    "onnx": ".onnx",
    "torch-export": ".pt2",
}
PARTS = ("backbone", "backbone+head")
ONNX_OPSET = 18  # the lowest opset torch's exporter implements; onnxruntime agrees to 1e-5 here
_RESNET_FORMATS = ("torchvision", "timm", "detectron2")

__all__ = ["FORMATS", "ONNX_OPSET", "PARTS", "detectron2_key", "export_model", "torchvision_key",
           "torchvision_state_dict"]

# --------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------

_TV_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^stem\.0\.weight$"), "conv1.weight"),
    (re.compile(r"^stem\.1\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^(layer[1-4]\.\d+)\.shortcut\.([01])\.(.+)$"), r"\1.downsample.\2.\3"),
    (re.compile(r"^(layer[1-4]\.\d+\.(?:conv[123]|bn[123])\..+)$"), r"\1"),
]


def torchvision_key(key: str) -> str:
    """instdisc ResNet backbone key -> torchvision's (``stem.0`` -> ``conv1``, ``shortcut`` -> ``downsample``).

    Raises:
        ValueError: not a key of instdisc's ResNet backbone.
    """
    for pat, repl in _TV_RULES:
        if pat.match(key):
            return pat.sub(repl, key)
    raise ValueError(f"{key!r} is not a key of instdisc's ResNet backbone")


def _head_keys(head_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """ProjectionHead keys -> torchvision's ``fc``: ``net.weight`` -> ``fc.weight`` (a linear
    head, so ``resnet18(num_classes=D)`` loads it), ``net.i.*`` -> ``fc.i.*`` (an MLP, as MoCo's
    code names its ``fc = Sequential(Linear, ReLU, Linear)``)."""
    return {"fc." + k.removeprefix("net."): v for k, v in head_sd.items()}


def torchvision_state_dict(backbone: nn.Module, head: nn.Module | None = None) -> dict[str, Tensor]:
    """A ResNet backbone (and its projection head) as a torchvision-named fp32 state dict."""
    sd = {torchvision_key(k): v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
          for k, v in backbone.state_dict().items()}
    if head is not None:
        sd.update({k: v.detach().float().cpu().clone() for k, v in _head_keys(head.state_dict()).items()})
    return sd


_D2_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(r"^bn1\.(.+)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv([123])\.weight$"), r"res{\1}.\2.conv\3.weight"),
    (re.compile(r"^layer([1-4])\.(\d+)\.bn([123])\.(.+)$"), r"res{\1}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"), r"res{\1}.\2.shortcut.weight"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.1\.(.+)$"), r"res{\1}.\2.shortcut.norm.\3"),
]


def detectron2_key(tv_key: str) -> str | None:
    """torchvision ResNet key -> detectron2's (``layer1`` is ``res2``; a BN is its conv's ``norm``).

    None for BN step counters, which detectron2's (frozen) BatchNorm does not keep.

    Raises:
        ValueError: not a ResNet trunk key (e.g. ``fc``).
    """
    if tv_key.endswith("num_batches_tracked"):
        return None
    for pat, repl in _D2_RULES:
        m = pat.match(tv_key)
        if m:
            out = pat.sub(repl, tv_key)
            return re.sub(r"res\{(\d)\}", lambda s: f"res{int(s.group(1)) + 1}", out)
    raise ValueError(f"{tv_key!r} is not a ResNet trunk key")


# --------------------------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------------------------


class ExportNet(nn.Module):
    """Backbone (+ head): normalised images (B, 3, S, S) -> (B, D) features, not L2-normalised."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        f = self.backbone(x)  # (B, F)
        return self.head(f) if self.head is not None else f  # (B, D)


def _head_of(module: nn.Module) -> nn.Module | None:
    """The projection head of a method or released model (None: SeLa's cluster heads, supervised)."""
    head = getattr(module, "head", None)
    return head if isinstance(head, nn.Module) else None


_LAYOUT_METHOD = {"lemniscate": "npid", "lemniscate-cifar": "npid", "pic": "pic", "sela": "sela",
                  "sela-v1": "sela", "sela-alexnet": "sela"}


def _paper(method: str) -> str:
    """The citation line of the method's module docstring (the one place each paper is named)."""
    import importlib

    try:
        doc = importlib.import_module(f"instdisc.methods.{method}").__doc__ or ""
    except ImportError:
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _torchvision_changes(arch: str, cifar_stem: bool, width: int) -> list[str]:
    """What a torchvision/timm user changes before ``load_state_dict(sd, strict=True)``."""
    out = []
    if cifar_stem:
        out.append(f"CIFAR stem: set model.conv1 = nn.Conv2d(3, {width}, kernel_size=3, stride=1, padding=1, "
                   "bias=False) and model.maxpool = nn.Identity() (instdisc's CIFAR ResNet: 3x3 stride-1 stem, "
                   "no max-pool)")
    if width != 64:
        out.append(f"width {width}: torchvision's and timm's {arch} constructors build width 64; this file has the "
                   f"same key names with narrower tensors and loads only into a {arch} built with first-stage "
                   f"width {width}")
    return out


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _atomic(out: Path, write: Callable[[Path], None]) -> None:
    """`checkpoint.atomic_write`, with a file-system error worded for the user."""
    from instdisc.checkpoint import atomic_write

    try:
        atomic_write(out, write)
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r}: {e.strerror or e}.") from None


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _probe(size: int, n: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S), like normalised images


def _write_onnx(net: ExportNet, size: int, out: Path) -> dict[str, Any]:
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("--format onnx needs onnx, onnxscript and onnxruntime: "
                        "pip install -c constraints.txt 'instdisc[export]'.") from None
    x = _probe(size)
    batch = torch.export.Dim("batch", min=1)

    def write(tmp: Path) -> None:
        import contextlib
        import io
        import logging

        # The exporter reports every stage on stdout and logs the torchvision operators it skips;
        # the card keeps what matters.
        log = logging.getLogger("torch.onnx")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x,), str(tmp), input_names=["images"], output_names=["features"],
                                  opset_version=ONNX_OPSET, dynamo=True, dynamic_shapes=({0: batch},),
                                  external_data=False, verbose=False)
        finally:
            log.setLevel(level)

    _atomic(out, write)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x2 = _probe(size, 5)  # another batch size than the one traced: the batch axis is dynamic
    got = torch.from_numpy(sess.run(None, {"images": x2.numpy()})[0])
    with torch.no_grad():
        diff = _max_diff(got, net(x2))
    return {"graph": {"opset": ONNX_OPSET, "input": "images (B, 3, S, S) float32", "output": "features (B, D) float32"},
            "check": {"runtime": f"onnxruntime {ort.__version__}", "max_abs_diff": diff, "inputs": "5 random images"}}


def _write_torch_export(net: ExportNet, size: int, out: Path) -> dict[str, Any]:
    x = _probe(size)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    _atomic(out, lambda tmp: torch.export.save(prog, str(tmp)))
    loaded = torch.export.load(str(out)).module()
    x2 = _probe(size, 5)
    with torch.no_grad():
        diff = _max_diff(loaded(x2), net(x2))
    return {"graph": {"input": "x (B, 3, S, S) float32", "output": "(B, D) float32"},
            "check": {"runtime": f"torch.export.load (torch {torch.__version__})", "max_abs_diff": diff,
                      "inputs": "5 random images"}}


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _training_progress(run_dir: Path) -> tuple[int | None, int | None]:
    """(whole epochs completed, optimiser steps) from metrics.jsonl; None where it has no record."""
    from instdisc.report import read_metrics

    records = read_metrics(run_dir)
    if not records:
        return None, None
    epochs = [r["epoch"] for r in records if r.get("type") == "epoch" and isinstance(r.get("epoch"), int)]
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return (max(epochs) if epochs else 0), (max(steps) if steps else None)


def _evaluation(run_dir: Path | None) -> list[dict[str, Any]]:
    """The run's evaluation results: RUN/eval/*.json and the final kNN of metrics.jsonl."""
    if run_dir is None:
        return []
    from instdisc.evaluate import load_results
    from instdisc.report import read_metrics

    out = []
    for name, res in load_results(run_dir).items():
        rec = {"protocol": name, "file": f"eval/{name}.json", "date": res.get("date"),
               "command": res.get("command") or "not recorded in the result file"}
        for k in ("features", "norm", "lr", "epochs", "top1", "top5", "classifier", "C"):
            if k in res:
                rec[k] = res[k]
        if isinstance(res.get("rows"), list):
            rec["rows"] = res["rows"]
        out.append(rec)
    finals = [r for r in read_metrics(run_dir) if r.get("type") == "final"]
    if finals:
        f = finals[-1]
        out.append({"protocol": "knn_final", "file": "metrics.jsonl (type final)",
                    "command": "instdisc train (its final weighted kNN, train features recomputed with the eval transform)",
                    **{k: v for k, v in f.items() if k.startswith("knn_")}, "epoch": f.get("epoch")})
    return out


def _card(subject: Any, *, fmt: str, part: str, out: Path, feat_dim: int, key_layout: str,
          notes: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    from instdisc import __version__

    cfg = subject.config
    published = "published_layout" in cfg
    if published:
        method = _LAYOUT_METHOD.get(cfg["published_layout"], "")
        arch = cfg["arch"]
        bb = subject.backbone
        cifar_stem = _is_cifar_stem(bb)
        width = _width_of(bb)
        training: dict[str, Any] = {"source": f"released weights, layout {cfg['published_layout']}",
                                    "data": None, "epochs": None}
    else:
        method = cfg["run"]["method"]
        arch, width, cifar_stem = cfg["model"]["arch"], cfg["model"]["width"], cfg["model"]["cifar_stem"]
        done, steps = _training_progress(subject.run_dir) if subject.run_dir else (None, None)
        training = {"data": cfg["data"]["data"], "epochs": cfg["optim"]["epochs"], "epochs_completed": done,
                    "steps": steps, "batch_size": cfg["optim"]["batch_size"], "config": "config.json of the run"}
    stem = ("CIFAR (3x3 stride-1 convolution, no max-pool)" if cifar_stem else
            "ImageNet (7x7 stride-2 convolution + 3x3 stride-2 max-pool)")
    if arch == "alexnet":
        stem = "32 px layout (5x5 stride-1 first convolution)" if cifar_stem else "224 px layout (11x11 stride-4)"
    output = ("pooled backbone features" if part == "backbone" else "projection-head output") + \
        " (not L2-normalised; normalise rows for kNN or retrieval)"
    return {
        "file": out.name,
        "format": fmt,
        "part": part,
        "key_layout": key_layout,
        "method": method,
        "paper": _paper(method) if method else "",
        "arch": arch,
        "width": width,
        "stem": "cifar" if cifar_stem else "imagenet",
        "stem_detail": stem,
        "input": {"size": subject.size, "channels": "RGB", "mean": list(subject.mean), "std": list(subject.std),
                  "transform": f"resize the short side to {subject.size} (bilinear, antialiased), centre-crop "
                               f"{subject.size}x{subject.size}, scale to [0, 1], subtract mean, divide by std"},
        "feature_dim": feat_dim,
        "output": output,
        "training": training,
        "source": str(subject.fingerprint.rsplit(":", 2)[0]),
        "evaluation": _evaluation(subject.run_dir),
        "notes": notes,
        **extra,
        "instdisc_version": __version__,
    }


def _card_markdown(card: dict[str, Any]) -> str:
    t = card["training"]
    inp = card["input"]
    lines = [
        f"# {card['file']}",
        "",
        f"- format: {card['format']} ({card['key_layout']}), part: {card['part']}",
        f"- method: {card['method'] or 'unknown'}" + (f"; {card['paper']}" if card["paper"] else ""),
        f"- architecture: {card['arch']}, width {card['width']}, {card['stem_detail']} stem",
        f"- input: {inp['size']}x{inp['size']} RGB, mean {inp['mean']}, std {inp['std']} ({inp['transform']})",
        f"- output: {card['feature_dim']}-d {card['output']}",
        "- training: " + (t.get("source") or f"data {t['data']}, {t['epochs']} epochs configured"
                          + (f", {t['epochs_completed']} completed" if t.get("epochs_completed") is not None else "")
                          + (f" ({t['steps']} steps)" if t.get("steps") is not None else "")
                          + f", batch {t['batch_size']}"),
    ]
    if "check" in card:
        c = card["check"]
        lines.append(f"- check: {c['runtime']} vs instdisc, max |difference| {c['max_abs_diff']:.2e} on {c['inputs']}")
    for n in card["notes"]:
        lines.append(f"- note: {n}")
    lines += ["", "## Evaluation", ""]
    if not card["evaluation"]:
        lines.append("No evaluation results in the run (RUN/eval/*.json, metrics.jsonl).")
    for e in card["evaluation"]:
        nums = ", ".join(f"{k} {e[k]:.2f}" for k in ("top1", "top5", "knn_top1", "knn_top5") if isinstance(e.get(k), float))
        if not nums and e.get("rows"):
            nums = "; ".join(
                " ".join(f"{k} {v:g}" for k, v in r.items() if k not in ("top1", "top5") and isinstance(v, (int, float)))
                + (f": top-1 {r['top1']:.2f}" if isinstance(r.get("top1"), float) else "")
                for r in e["rows"][:8]) + ("; ..." if len(e["rows"]) > 8 else "")
        lines.append(f"- {e['protocol']}: {nums} (`{e['command']}`)")
    return "\n".join(lines) + "\n"


def _is_cifar_stem(bb: nn.Module) -> bool:
    from instdisc.models import AlexNet

    if isinstance(bb, AlexNet):
        return bb.convs[0][0].kernel_size[0] != 11
    return bb.stem[0].kernel_size[0] == 3  # type: ignore[index]


def _width_of(bb: nn.Module) -> int:
    from instdisc.models import AlexNet

    if isinstance(bb, AlexNet):
        return max(1, round(bb.convs[0][0].out_channels * 64 / 96))
    return int(bb.stem[0].out_channels)  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def export_model(path: str | Path, fmt: str, out: str | Path, *, part: str = "backbone",
                 layout: str | None = None) -> dict[str, Any]:
    """Write a run's (or released weights') backbone [+ head] as `fmt` to `out`, and its model card.

    Args:
        path: run directory, instdisc checkpoint, or released weights (`instdisc weights`).
        fmt: one of `FORMATS`.
        out: the file to write; the card goes to ``out.card.json`` and ``out.card.md``.
        part: ``backbone`` (pooled features) or ``backbone+head`` (the projection head's output).
        layout: force the layout of released weights (default: detected).

    Returns:
        The model card (also written).

    Raises:
        UserError: unknown format or part, an architecture the format cannot hold, a method
            without a projection head for ``backbone+head``, an unreadable run or file.
    """
    from instdisc.evaluate import load_subject
    from instdisc.models import ResNet

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if part not in PARTS:
        raise UserError(f"--part {part!r} is not one of {', '.join(PARTS)}.")
    out = Path(out)
    subject = load_subject(path, device="cpu", layout=layout)  # CheckpointError names the file
    bb = subject.backbone.float().eval()
    head = _head_of(subject.module) if part == "backbone+head" else None
    if part == "backbone+head" and head is None:
        raise UserError(f"--part backbone+head: {subject.name} has no projection head (SeLa's outputs are cluster "
                        "classifiers; a supervised run's is its classifier); export --part backbone.")
    if head is not None:
        head = head.float().eval()
    is_resnet = isinstance(bb, ResNet)
    arch = subject.config.get("arch") or subject.config.get("model", {}).get("arch", "?")
    if fmt in _RESNET_FORMATS and not is_resnet:
        raise UserError(f"--format {fmt}: {subject.name} is a {arch}; {fmt} holds ResNets only "
                        "(export it as safetensors, onnx or torch-export).")
    if fmt == "detectron2" and part != "backbone":
        raise UserError("--format detectron2 takes the backbone only (--part backbone): detection heads are new.")
    from instdisc.checkpoint import check_out_file

    check_out_file(out, inputs=(path,))
    net = ExportNet(bb, head).eval()
    with torch.no_grad():
        feat_dim = int(net(_probe(subject.size, 1)).shape[1])
    cifar_stem = _is_cifar_stem(bb)
    width = _width_of(bb)
    notes: list[str] = []
    extra: dict[str, Any] = {}
    key_layout = "torchvision" if is_resnet else "instdisc"

    if fmt in ("torchvision", "timm", "safetensors") and is_resnet:
        sd = torchvision_state_dict(bb, head)
        notes += _torchvision_changes(arch, cifar_stem, width)
        if head is None:
            notes.append("torchvision: set model.fc = nn.Identity() before loading (the file has no fc); "
                         f"timm: timm.create_model('{arch}', num_classes=0)")
        elif "fc.weight" in sd:
            notes.append(f"the head is a linear layer: torchvision.models.{arch}(num_classes={feat_dim}) or "
                         f"timm.create_model('{arch}', num_classes={feat_dim}) loads it as fc")
        else:
            notes.append("the head is an MLP, saved as fc.0 / fc.1 / ... (ProjectionHead's Sequential); replace "
                         "model.fc by the same nn.Sequential before loading")
    elif fmt == "safetensors":
        named = {**bb.state_dict(), **({f"head.{k}": v for k, v in head.state_dict().items()} if head else {})}
        sd = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone() for k, v in named.items()}
        notes.append(f"instdisc's own module names: instdisc.models.build_backbone('{arch}', width={width}, "
                     f"cifar_stem={cifar_stem})[0].load_state_dict(sd) loads it")
    if cifar_stem and fmt == "detectron2":
        notes.append("CIFAR stem: detectron2's BasicStem is a 7x7 stride-2 convolution + max-pool; loading this "
                      "stem.conv1 (3x3) needs a custom stem (3x3 stride 1, no max-pool)")
        warnings.warn(f"{subject.name} has the CIFAR stem: detectron2's standard stem cannot hold it "
                      "(see the card's notes).", InstdiscWarning, stacklevel=2)
    if width != 64 and fmt in _RESNET_FORMATS:
        warnings.warn(f"{subject.name} has width {width}: the file loads only into a {arch} of that width "
                      "(torchvision, timm and detectron2 build 64).", InstdiscWarning, stacklevel=2)

    if fmt in ("torchvision", "timm"):
        _atomic(out, lambda tmp: torch.save(sd, tmp))
    elif fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UserError("--format safetensors needs the safetensors package: "
                            "pip install -c constraints.txt 'instdisc[export]'.") from None
        card_meta = {"format": "instdisc-export", "key_layout": key_layout, "arch": arch, "width": str(width),
                     "stem": "cifar" if cifar_stem else "imagenet", "part": part, "input_size": str(subject.size),
                     "mean": json.dumps(list(subject.mean)), "std": json.dumps(list(subject.std)),
                     "feature_dim": str(feat_dim), "notes": json.dumps(notes)}
        contiguous = {k: v.contiguous() for k, v in sd.items()}
        _atomic(out, lambda tmp: save_file(contiguous, str(tmp), metadata=card_meta))
    elif fmt == "detectron2":
        tv = torchvision_state_dict(bb)
        d2 = {}
        for k, v in tv.items():
            k2 = detectron2_key(k)
            if k2 is not None:
                d2[k2] = v.numpy()
        key_layout = "detectron2"
        payload = {"model": d2, "__author__": "instdisc", "matching_heuristics": True}

        def write_pickle(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                pickle.dump(payload, fh)

        _atomic(out, write_pickle)
        depth = {"resnet18": 18, "resnet34": 34, "resnet50": 50}[arch]
        pix_mean = [round(255 * m, 3) for m in subject.mean]
        pix_std = [round(255 * v, 3) for v in subject.std]
        res2 = " MODEL.RESNETS.RES2_OUT_CHANNELS=64" if depth < 50 else ""
        notes.append(f"detectron2 config: MODEL.WEIGHTS=this file MODEL.RESNETS.DEPTH={depth}{res2} INPUT.FORMAT=RGB "
                     f"MODEL.PIXEL_MEAN={pix_mean} MODEL.PIXEL_STD={pix_std}")
        if width != 64:
            notes.append(f"width {width}: detectron2 builds its ResNets at width 64 (STEM_OUT_CHANNELS 64; "
                         "RES2_OUT_CHANNELS 64 for R18/R34, 256 for R50), which this backbone does not fit")
    elif fmt == "onnx":
        key_layout = "onnx graph"
        extra = _write_onnx(net, subject.size, out)
    else:
        key_layout = "torch.export program"
        extra = _write_torch_export(net, subject.size, out)

    card = _card(subject, fmt=fmt, part=part, out=out, feat_dim=feat_dim, key_layout=key_layout, notes=notes,
                 extra=extra)
    from instdisc.checkpoint import atomic_write_text

    atomic_write_text(card_path(out, ".json"), json.dumps(card, indent=2))
    atomic_write_text(card_path(out, ".md"), _card_markdown(card))
    return card


def card_path(out: str | Path, suffix: str) -> Path:
    """``FILE.card.json`` / ``FILE.card.md`` beside the exported FILE."""
    out = Path(out)
    return out.with_name(f"{out.name}.card{suffix}")

