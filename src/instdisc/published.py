"""The seed papers' released weights, loaded into our backbones for evaluation.

A released checkpoint is read (`read_weights`), its layout recognised (`detect_layout`), every
key renamed to ours (`convert`) and the result loaded strictly into `models.build_backbone`
(`load_published`). Nothing is loaded by guesswork: every source key must map to one of ours or
be on the layout's short list of training-only state (PIC's N x 128 classifier, MoCo's queue...);
every key of our model must be filled; shapes must agree. Otherwise a `CheckpointError` lists the
offending keys. The key layouts and where they come from are in docs/evaluation.md.

Layouts (`LAYOUTS`): lemniscate (NPID ImageNet ResNet-18/50), lemniscate-cifar (NPID cifar.py),
pic (bl0/PIC current.pth, also its InstDisc/MoCo/SimCLR re-implementations), sela (SeLa's
torchvision-layout ResNet releases), sela-v1 (SeLa's own `resnetv1` state dicts), sela-alexnet
(SeLa's AlexNet releases, into models.AlexNet), and sela-v2 (pre-activation ResNet-50, the original
resnet-10x3k.pth), which our models do not cover: recognised to say so.
"""

from __future__ import annotations

import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.augment import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from instdisc.errors import CheckpointError
from instdisc.models import ARCHS, ProjectionHead, build_backbone

# --------------------------------------------------------------------------------------------
# Reading: weights-only first; pickled helper objects become inert placeholders
# --------------------------------------------------------------------------------------------

# Globals the fallback reader resolves for real: what tensors, state dicts and plain values need.
_REAL_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class Placeholder:
    """Stands for any pickled object the reader does not trust (a module, argparse.Namespace, ...).

    It records what it replaced and the state it was given; it never runs code of the original.
    """

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self._qualname}>"


class _InertUnpickler(pickle.Unpickler):
    _cache: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL_GLOBALS:
            return super().find_class(module, name)
        key = (module, name)
        if key not in self._cache:
            self._cache[key] = type(name, (Placeholder,), {"_qualname": f"{module}.{name}"})
        return self._cache[key]


_inert_pickle = types.ModuleType("instdisc_inert_pickle")
_inert_pickle.Unpickler = _InertUnpickler  # type: ignore[attr-defined]
_inert_pickle.load = lambda f, **kw: _InertUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_inert_pickle.__name__ = "instdisc_inert_pickle"


def read_weights(path: str | Path) -> Any:
    """Load a checkpoint file onto the CPU without executing code from it.

    `torch.load(weights_only=True)` first. Released checkpoints often also pickle training objects
    (lemniscate's NCEAverage module, PIC's argparse options); those cannot be read weights-only, so
    the fallback resolves only the globals tensors and state dicts need and turns every other one
    into an inert `Placeholder`. Tensors come back intact either way.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{str(p)!r} is not a file.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # globals outside the weights-only allowlist: retry with placeholders
    except Exception as e:
        raise CheckpointError(f"{str(p)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}).") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)
    except Exception as e:
        raise CheckpointError(f"{str(p)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}).") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def is_instdisc_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "format" in obj and "config" in obj and "model" in obj and "num_samples" in obj


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One released key layout.

    Attributes:
        name: key of `LAYOUTS` (the --layout value).
        description: what it is and which files use it.
        container: keys of the top-level dict that may hold the state dict, in order of preference
            (empty: the file is the state dict itself).
        prefixes: prefixes stripped from every key (the first that matches), e.g. DataParallel's
            "module.".
        ignore: regexes of (stripped) keys that are training-only state, left out on purpose.
        input_size, mean, std: the eval transform the weights were trained for.
        supported: False for layouts recognised only to explain why they cannot be loaded.
    """

    name: str
    description: str
    container: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    supported: bool = True
    why_not: str = ""


LAYOUTS: dict[str, Layout] = {
    "lemniscate": Layout(
        "lemniscate",
        "NPID (zhirongw/lemniscate.pytorch) main.py ImageNet checkpoints, e.g. lemniscate_resnet18.pth / "
        "lemniscate_resnet50.pth: {'epoch', 'arch', 'state_dict', 'lemniscate', 'best_prec1', 'optimizer'}; "
        "state_dict = DataParallel ('module.') torchvision ResNet with fc = Linear(512*expansion, 128)",
        container=("state_dict",), prefixes=("module.",),
    ),
    "lemniscate-cifar": Layout(
        "lemniscate-cifar",
        "NPID cifar.py checkpoints (checkpoint/ckpt.t7): {'net', 'lemniscate', 'acc', 'epoch'}; net = "
        "('module.') CIFAR ResNet (3x3 stem, 'shortcut' projections) with linear = Linear(512, 128)",
        container=("net", "state_dict"), prefixes=("module.",), input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD,
    ),
    "pic": Layout(
        "pic",
        "bl0/PIC main_pretrain.py current.pth / ckpt_epoch_*.pth: {'opt', 'model', 'optimizer', 'scheduler', "
        "'epoch'[, 'amp', 'sampler']}; model = DDP ('module.') wrapper whose encoder is a torchvision-style "
        "ResNet with fc1/fc2 (--mlp-head: 2048-2048-128, no BN) or fc; training state: sim_matrix (PIC), "
        "memory (InstDisc), encoder_k/queue/queue_ptr (MoCo)",
        container=("model", "state_dict"), prefixes=("module.encoder.", "encoder."),
        ignore=(r"^module\.sim_matrix$", r"^module\.memory$", r"^module\.queue(_ptr)?$", r"^module\.encoder_k\..*",
                r"^sim_matrix$", r"^memory$", r"^queue(_ptr)?$", r"^encoder_k\..*"),
    ),
    "sela": Layout(
        "sela",
        "SeLa (yukimasano/self-label) torchvision-layout releases, e.g. resnet50-10x3k_pp.pth, resnet50-1k_pp.pth, "
        "resnet18-1k_pp.pth: {'state_dict', 'labels'}; state_dict = torchvision ResNet whose fc is the first "
        "clustering head (K outputs)",
        container=("state_dict",), prefixes=("module.",),
    ),
    "sela-v1": Layout(
        "sela-v1",
        "SeLa's own models.resnetv1 state dicts: features.0 conv, features.1 BN, features.4-7 = layer1-4 "
        "(torchvision blocks), top_layer.0 (one head) or top_layer0..H-1 (H heads); DataParallel on "
        "`features` adds 'features.module.'",
        container=("state_dict", "model"), prefixes=("module.",),
    ),
    "sela-v2": Layout(
        "sela-v2",
        "SeLa's models.resnetv2 (pre-activation ResNet-50, the original resnet-10x3k.pth): features.0 conv, "
        "features.2-5 = pre-activation bottleneck stages, top_layer0..9",
        container=("state_dict", "model"), prefixes=("module.",), supported=False,
        why_not="it is a pre-activation ResNet (BN-ReLU before each convolution, no BN after the stem), "
        "which instdisc's post-activation ResNets cannot hold; SeLa's torchvision-layout re-releases "
        "(resnet50-10x3k_pp.pth, layout 'sela') load",
    ),
    "sela-alexnet": Layout(
        "sela-alexnet",
        "SeLa's models.alexnet ('big' CFG with BN): features.{0,4,8,11,14} conv, features.{1,5,9,12,15} BN, "
        "classifier.1/classifier.4 = Linear(9216, 4096)/Linear(4096, 4096), top_layer0..H-1",
        container=("state_dict", "model"), prefixes=("module.",),
    ),
}


def _unwrap(obj: Any, layout: Layout) -> dict[str, Tensor]:
    sd = obj
    if isinstance(obj, dict):
        for key in layout.container:
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"no state dict found for layout {layout.name!r} (looked in {list(layout.container)}).")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"layout {layout.name!r}: these entries are not tensors: {_listing(bad)}")
    return dict(sd)


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _state_of(obj: Any) -> dict[str, Tensor] | None:
    """The state dict inside obj, whatever its container, for detection."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    return None


def detect_layout(obj: Any) -> str:
    """The name of the layout of a loaded checkpoint (file object or bare state dict).

    Raises:
        CheckpointError: nothing matches; the message lists the top-level keys.
    """
    sd = _state_of(obj)
    top = list(obj) if isinstance(obj, dict) else []
    if sd is None:
        raise CheckpointError(
            f"cannot find a state dict in this checkpoint (top-level keys: {_listing([str(k) for k in top])}); "
            f"pass --layout (one of {', '.join(LAYOUTS)})."
        )
    keys = [str(k) for k in sd]
    if any(k.startswith(("module.encoder.", "encoder.")) for k in keys):
        return "pic"
    base = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    if any(k.startswith("features.") for k in base):
        feats = {re.sub(r"^features\.(module\.)?", "features.", k) for k in base}
        w0 = sd.get(next((k for k in keys if re.search(r"features\.(module\.)?0\.weight$", k)), ""), None)
        if w0 is not None and w0.ndim == 4 and w0.shape[-1] == 11:
            return "sela-alexnet"
        if "features.1.running_mean" in feats:
            return "sela-v1"
        return "sela-v2"
    if "linear.weight" in base and "conv1.weight" in base:
        return "lemniscate-cifar"
    if "conv1.weight" in base:
        if isinstance(obj, dict) and ("labels" in obj or ("fc.weight" in base and sd[keys[base.index("fc.weight")]].shape[0] > 512)):
            return "sela"
        if isinstance(obj, dict) and "net" in obj:
            return "lemniscate-cifar"
        return "lemniscate"
    raise CheckpointError(
        f"unknown checkpoint layout: none of {', '.join(LAYOUTS)} matches keys like {_listing(keys, 8)}; "
        "pass --layout if you know it."
    )


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------

_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^conv1\.weight$"), "stem.0.weight"),
    (re.compile(rf"^bn1\.({_BN})$"), r"stem.1.\1"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.(conv[123]\.weight|bn[123]\.{_BN})$"), r"layer\1.\2.\3"),
    (re.compile(r"^layer([1-4])\.(\d+)\.(?:downsample|shortcut)\.([01])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
     r"layer\1.\2.shortcut.\3.\4"),
]
# SeLa's resnetv1 keeps the trunk in one Sequential: conv, BN, ReLU, max-pool, layer1..4, pool.
_SELA_V1_RENAME = [(r"^features\.0\.", "conv1."), (r"^features\.1\.", "bn1."), (r"^features\.4\.", "layer1."),
                   (r"^features\.5\.", "layer2."), (r"^features\.6\.", "layer3."), (r"^features\.7\.", "layer4.")]


def resnet_key(key: str) -> str | None:
    """torchvision / kuangliu ResNet key -> our backbone key, or None if it is not a trunk key."""
    for pat, repl in _RESNET_RULES:
        if pat.match(key):
            return pat.sub(repl, key)
    return None


@dataclass
class Converted:
    """A released checkpoint in our names, ready for `PublishedModel`."""

    layout: str
    arch: str
    width: int
    cifar_stem: bool
    backbone: dict[str, Tensor]
    head: dict[str, Tensor] = field(default_factory=dict)  # ProjectionHead keys
    head_dims: tuple[int, int, int] | None = None  # (in, hidden or 0, out)
    cluster_heads: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (K, F) weight, (K,) bias
    ignored: list[str] = field(default_factory=list)  # source keys left out on purpose
    filled: list[str] = field(default_factory=list)  # our keys the source lacks (BN step counters)

    def summary(self) -> str:
        head = "none"
        if self.head_dims:
            i, h, o = self.head_dims
            head = f"{i}->{h}->{o} MLP" if h else f"linear {i}->{o}"
        clusters = f", {len(self.cluster_heads)} clustering head(s) of {self.cluster_heads[0][0].shape[0]}" if self.cluster_heads else ""
        return (f"layout {self.layout}: {self.arch} (width {self.width}, {'CIFAR' if self.cifar_stem else 'ImageNet'} stem), "
                f"{len(self.backbone)} backbone tensors, embedding head {head}{clusters}; "
                f"{len(self.ignored)} training-only keys left out, {len(self.filled)} BN counters filled")


def _arch_of(bb: dict[str, Tensor]) -> tuple[str, int, bool]:
    bottleneck = any(k.endswith(".conv3.weight") for k in bb)
    blocks = []
    for layer in range(1, 5):
        ids = {int(k.split(".")[1]) for k in bb if k.startswith(f"layer{layer}.")}
        blocks.append(len(ids))
    stem = bb.get("stem.0.weight")
    if stem is None:
        raise CheckpointError("the checkpoint has no stem convolution (conv1.weight).")
    table = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50"}
    arch = table.get((bottleneck, tuple(blocks)))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(
            f"a ResNet with {kind} blocks {tuple(blocks)} per stage is not one of instdisc's backbones "
            f"({', '.join(sorted(ARCHS))})."
        )
    return arch, int(stem.shape[0]), int(stem.shape[-1]) == 3


def _check_against(model: nn.Module, sd: dict[str, Tensor], what: str) -> list[str]:
    """Fill BN counters the source lacks; raise on any other missing, unexpected or mis-shaped key."""
    ours = model.state_dict()
    filled = []
    for k, v in ours.items():
        if k not in sd and k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros_like(v)
            filled.append(k)
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}" for k in ours
              if k in sd and sd[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"not in our {what}: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"the weights do not fit the {what}: " + "; ".join(problems) + ".")
    return filled


def convert(obj: Any, layout: str | None = None) -> Converted:
    """Rename a released checkpoint's tensors to ours and check them against our model.

    Args:
        obj: the loaded file (`read_weights`) or a bare state dict.
        layout: a key of `LAYOUTS`; default `detect_layout(obj)`.
    Raises:
        CheckpointError: unknown or unsupported layout, unmatched keys, missing keys, wrong shapes.
    """
    if is_instdisc_checkpoint(obj):  # not a released layout: every evaluation command reads it as a run
        run = obj["config"].get("run") if isinstance(obj["config"], dict) else None
        method = run.get("method", "?") if isinstance(run, dict) else "?"
        raise CheckpointError(
            f"this is an instdisc training checkpoint ({method}), not released weights: give it (or its run "
            "folder) to `instdisc knn`, `linear`, `report` or `export` as it is; `weights` checks NPID, PIC "
            "and SeLa files from the papers' releases."
        )
    name = layout or detect_layout(obj)
    if name not in LAYOUTS:
        raise CheckpointError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}.")
    lay = LAYOUTS[name]
    if not lay.supported:
        raise CheckpointError(f"this checkpoint has SeLa's {name} layout: {lay.why_not}.")
    sd = _unwrap(obj, lay)
    if name == "sela-alexnet":
        return _convert_alexnet(sd, lay)

    backbone, head, clusters, ignored, unmatched = {}, {}, {}, [], []
    ignore = [re.compile(p) for p in lay.ignore]
    for raw, v in sd.items():
        if any(p.match(raw) for p in ignore):
            ignored.append(raw)
            continue
        k = _strip(raw, lay.prefixes)
        if name == "pic" and k == raw:
            unmatched.append(raw)  # everything of PIC's model that is not ignored lives in its encoder
            continue
        if name == "sela-v1":
            k = re.sub(r"^features\.module\.", "features.", k)
            for pat, repl in _SELA_V1_RENAME:
                k = re.sub(pat, repl, k)
        ours = resnet_key(k)
        if ours is not None:
            backbone[ours] = v
            continue
        m = re.match(r"^(fc|linear|fc1|fc2)\.(weight|bias)$", k)
        if m and not (name == "sela" and m.group(1) != "fc"):
            head[k] = v
            continue
        m = re.match(r"^top_layer(?:\.0|(\d+))\.(weight|bias)$", k)
        if m and name == "sela-v1":
            clusters.setdefault(int(m.group(1) or 0), {})[m.group(2)] = v
            continue
        unmatched.append(raw)
    if unmatched:
        raise CheckpointError(
            f"layout {name!r}: {len(unmatched)} key(s) match nothing in instdisc's models: {_listing(unmatched)}."
        )
    arch, width, cifar_stem = _arch_of(backbone)
    net, feat_dim = build_backbone(arch, width=width, cifar_stem=cifar_stem)
    filled = _check_against(net, backbone, f"{arch} backbone")
    conv = Converted(name, arch, width, cifar_stem, backbone, ignored=ignored, filled=filled)

    if name == "sela":
        if "fc.weight" in head:
            clusters[0] = {"weight": head.pop("fc.weight"), "bias": head.pop("fc.bias", None)}
    for h in sorted(clusters):
        w, b = clusters[h].get("weight"), clusters[h].get("bias")
        if w is None or w.ndim != 2 or w.shape[1] != feat_dim:
            raise CheckpointError(f"clustering head {h} has no (K, {feat_dim}) weight.")
        conv.cluster_heads.append((w, b if b is not None else torch.zeros(w.shape[0])))
    if "fc1.weight" in head:
        w1, w2 = head.get("fc1.weight"), head.get("fc2.weight")
        if w2 is None:
            raise CheckpointError("the MLP head has fc1 but no fc2.")
        conv.head_dims = (int(w1.shape[1]), int(w1.shape[0]), int(w2.shape[0]))
        conv.head = {"net.0.weight": w1, "net.0.bias": head.get("fc1.bias"),
                     "net.2.weight": w2, "net.2.bias": head.get("fc2.bias")}
    elif head:
        lin = "fc" if "fc.weight" in head else "linear"
        w = head.get(f"{lin}.weight")
        if w is None:
            raise CheckpointError(f"the head has {lin}.bias but no {lin}.weight.")
        conv.head_dims = (int(w.shape[1]), 0, int(w.shape[0]))
        conv.head = {"net.weight": w, "net.bias": head.get(f"{lin}.bias")}
    if conv.head_dims is not None:
        conv.head = {k: v for k, v in conv.head.items() if v is not None}
        i, h, o = conv.head_dims
        _check_against(ProjectionHead(i, o, h, bn=False), dict(conv.head), "projection head")
        if i != feat_dim:
            raise CheckpointError(f"the head takes {i}-d inputs but the {arch} backbone gives {feat_dim}-d features.")
    return conv


_ALEXNET_CONVS = (0, 4, 8, 11, 14)  # SeLa's features.N holding the five convolutions
_ALEXNET_BNS = (1, 5, 9, 12, 15)  # and the BatchNorms after them


def _convert_alexnet(sd: dict[str, Tensor], lay: Layout) -> Converted:
    """SeLa's AlexNet -> ours (models.AlexNet: convs.i = [conv, BN, ReLU(, max-pool)], classifier).

    SeLa's convolutions have biases and ours do not (a BN follows each): in eval mode
    BN(conv(x) + b) = BN'(conv(x)) with BN' the same layer whose running mean is mu - b, so each
    bias is folded into the following running mean, exactly.
    """
    bb: dict[str, Tensor] = {}
    biases: dict[int, Tensor] = {}
    clusters: dict[int, dict[str, Tensor]] = {}
    unmatched = []
    for raw, v in sd.items():
        k = re.sub(r"^features\.module\.", "features.", _strip(raw, lay.prefixes))
        m = re.match(r"^features\.(\d+)\.(.+)$", k)
        if m and int(m.group(1)) in _ALEXNET_CONVS and m.group(2) in ("weight", "bias"):
            i = _ALEXNET_CONVS.index(int(m.group(1)))
            if m.group(2) == "bias":
                biases[i] = v
            else:
                bb[f"convs.{i}.0.weight"] = v
            continue
        if m and int(m.group(1)) in _ALEXNET_BNS and re.fullmatch(_BN, m.group(2)):
            bb[f"convs.{_ALEXNET_BNS.index(int(m.group(1)))}.1.{m.group(2)}"] = v
            continue
        if re.fullmatch(r"classifier\.[14]\.(weight|bias)", k):
            bb[k] = v
            continue
        m = re.match(r"^top_layer(?:\.0|(\d+))?\.(weight|bias)$", k)
        if m:
            clusters.setdefault(int(m.group(1) or 0), {})[m.group(2)] = v
            continue
        unmatched.append(raw)
    if unmatched:
        raise CheckpointError(
            f"layout 'sela-alexnet': {len(unmatched)} key(s) match nothing in instdisc's AlexNet: {_listing(unmatched)}."
        )
    first = bb.get("convs.0.0.weight")
    if first is None:
        raise CheckpointError("layout 'sela-alexnet': the checkpoint has no first convolution (features.0.weight).")
    for i, b in biases.items():
        mean = bb.get(f"convs.{i}.1.running_mean")
        if mean is None or mean.shape != b.shape:
            raise CheckpointError(f"layout 'sela-alexnet': convolution {i} has a bias but no matching BatchNorm to fold it into.")
        bb[f"convs.{i}.1.running_mean"] = mean - b
    width = max(1, round(int(first.shape[0]) * 64 / 96))
    cifar_stem = int(first.shape[-1]) != 11
    net, feat_dim = build_backbone("alexnet", width=width, cifar_stem=cifar_stem)
    filled = _check_against(net, bb, "alexnet backbone")
    conv = Converted("sela-alexnet", "alexnet", width, cifar_stem, bb, filled=filled)
    for h in sorted(clusters):
        w, b = clusters[h].get("weight"), clusters[h].get("bias")
        if w is None or w.ndim != 2 or w.shape[1] != feat_dim:
            raise CheckpointError(f"clustering head {h} has no (K, {feat_dim}) weight.")
        conv.cluster_heads.append((w, b if b is not None else torch.zeros(w.shape[0])))
    return conv


# --------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------


class PublishedModel(nn.Module):
    """Our backbone (+ the released embedding head and clustering heads) with released weights.

    `embed(x)` is the L2-normalised head output where the release has an embedding head (NPID's
    128-d fc, PIC's MLP), else the L2-normalised pooled backbone features (SeLa, whose heads are
    cluster classifiers; `cluster_logits` gives those).
    """

    def __init__(self, conv: Converted) -> None:
        super().__init__()
        lay = LAYOUTS[conv.layout]
        self.layout, self.arch = conv.layout, conv.arch
        # Our 32 px AlexNet variant has a 5x5 first convolution; SeLa's releases are all 224 px.
        self.input_size = 32 if conv.arch == "alexnet" and conv.cifar_stem else lay.input_size
        self.norm_stats = (lay.mean, lay.std)
        self.backbone, self.feat_dim = build_backbone(conv.arch, width=conv.width, cifar_stem=conv.cifar_stem)
        self.backbone.load_state_dict(conv.backbone, strict=True)
        self.head: nn.Module | None = None
        if conv.head_dims is not None:
            i, h, o = conv.head_dims
            self.head = ProjectionHead(i, o, h, bn=False)
            self.head.load_state_dict(conv.head, strict=True)
        self.cluster_heads = nn.ModuleList()
        for w, b in conv.cluster_heads:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": b})
            self.cluster_heads.append(lin)
        self.summary = conv.summary()

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        f = self.backbone(x)  # (B, F)
        z = self.head(f) if self.head is not None else f  # (B, D)
        return F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def cluster_logits(self, x: Tensor) -> list[Tensor]:
        f = self.backbone(x)
        return [h(f) for h in self.cluster_heads]  # H x (B, K)


def load_published(obj_or_path: Any, *, layout: str | None = None, source: str = "") -> PublishedModel:
    """A released checkpoint (path or loaded object) -> `PublishedModel` in eval mode (CPU)."""
    obj = read_weights(obj_or_path) if isinstance(obj_or_path, (str, Path)) else obj_or_path
    try:
        conv = convert(obj, layout)
    except CheckpointError as e:
        where = str(obj_or_path) if isinstance(obj_or_path, (str, Path)) else source
        raise CheckpointError(f"{where + ': ' if where else ''}{e}") from None
    return PublishedModel(conv).eval()
