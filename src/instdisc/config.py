"""Typed run configuration: dataclasses -> argparse flags and flat YAML presets -> dataclasses.

Resolution order: dataclass defaults, then `--config preset.yaml`, then command-line flags. A
preset is a flat mapping whose keys are the flag names (dashes or underscores both work); an
unknown key is an error with a "did you mean". The resolved configuration is written to
`RUN_DIR/config.json` and into every checkpoint, so a run can be rebuilt from it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from instdisc.augment import AugmentConfig
from instdisc.errors import ConfigError


@dataclass
class DataConfig:
    data: str = field(
        default="digits",
        metadata={"help": "digits | synthetic[:N] | cifar10 | cifar100 | a folder | a .tar/.tar.gz/.zip archive"},
    )
    test_data: str | None = field(
        default=None, metadata={"help": "evaluation source (default: the test split of --data)"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "decoded-image cache (default $INSTDISC_CACHE or ~/.cache/instdisc)"}
    )
    download: bool = field(default=False, metadata={"help": "download CIFAR from its official URL if absent"})
    image_size: int | None = field(
        default=None, metadata={"help": "side of the stored images, made square by a short-side resize and a centre crop "
                                         "(default: small images keep their size; large images are not squared: each "
                                         "training view is cropped from the whole image, evaluation resizes to 256/224 "
                                         "of --aug-size and centre-crops)"}
    )
    workers: int = field(default=4, metadata={"help": "decoding workers for streamed (large-image) sources"})
    in_memory: bool = field(
        default=True,
        metadata={"help": "hold a small-image training set as one uint8 tensor on the training device (batches "
                          "are index_selects, no workers); --no-in-memory streams it through DataLoader workers "
                          "like a large-image source, to compare the two paths. Same batches either way"},
    )
    sampler: Literal["shuffle", "sliding"] = field(
        default="shuffle",
        metadata={"help": "data order: a fresh permutation per epoch, or PIC's sliding window (an epoch is still N images)"},
    )
    window: int = field(
        default=0, metadata={"help": "--sampler sliding: window D in images; 0 = N // 10 (PIC ImageNet: 131072)"}
    )
    stride: int = field(
        default=0, metadata={"help": "--sampler sliding: slide S per window; 0 = D // 8 (PIC ImageNet: 16384)"}
    )


@dataclass
class ModelConfig:
    arch: str = field(default="resnet18", metadata={"help": "resnet18 | resnet34 | resnet50 | alexnet (SeLa's)"})
    width: int = field(default=64, metadata={"help": "channels of the first stage (64 = standard; 16/32 for CPU)"})
    cifar_stem: bool = field(
        default=True, metadata={"help": "3x3 stem without max-pool for 32-px images (NPID's CIFAR ResNet)"}
    )


@dataclass
class OptimConfig:
    epochs: int = field(default=200, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "global batch size, split across ranks"})
    lr: float = field(default=0.03, metadata={"help": "base learning rate (NPID: 0.03)"})
    scale_lr: bool = field(default=False, metadata={"help": "multiply --lr by batch_size / 256 (PIC, MoCo)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay (NPID CIFAR: 5e-4, ImageNet: 1e-4)"})
    schedule: Literal["step", "cosine", "constant"] = field(
        default="step", metadata={"help": "lr schedule, evaluated per step"}
    )
    milestones: list[int] = field(
        default_factory=lambda: [120, 160], metadata={"help": "epochs of the step schedule's drops"}
    )
    gamma: float = field(default=0.1, metadata={"help": "factor of each step drop"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up from lr/100 over this many epochs"})
    clip_grad: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    optimizer_impl: Literal["auto", "plain", "foreach", "fused"] = field(
        default="auto",
        metadata={"help": "SGD kernels (same maths, other rounding): auto = torch's choice (foreach on GPU), "
                          "plain, foreach (multi-tensor), fused (one kernel; fastest on GPU). Methods with their "
                          "own optimiser (PIC's sampled rows) ignore it"},
    )


@dataclass
class RunConfig:
    method: str = field(default="npid", metadata={"help": "the method to train: a key of instdisc.methods.METHODS"})
    out: str = field(default="runs/default", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "seed of all randomness (model init, data order, augmentation)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "autocast dtype; auto = bf16 where supported, else fp32"}
    )
    channels_last: bool = field(default=True, metadata={"help": "NHWC memory format (faster convs on CPU and GPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU)"})
    knn_every: int = field(default=1, metadata={"help": "run the kNN monitor every N epochs (0 = only at the end)"})
    knn_k: int = field(default=200, metadata={"help": "neighbours of the kNN monitor (NPID: 200)"})
    knn_t: float = field(default=0.07, metadata={"help": "temperature of the kNN weights exp(s/t)"})
    log_every: int = field(default=20, metadata={"help": "steps between metric lines"})
    ckpt_every_steps: int = field(default=0, metadata={"help": "also checkpoint every N steps (0 = per epoch only)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps in total (0 = no limit)"})
    time_limit: float = field(
        default=0.0,
        metadata={"help": "minutes of wall time after which the run checkpoints at the next step boundary and "
                          "exits with status 0; --resume continues it (chains a long run into fixed-length "
                          "jobs; leave a minute's margin for the last step and the save). 0 = no limit"},
    )
    skip_nonfinite: int = field(
        default=0,
        metadata={"help": "skip up to N steps whose loss or gradient is NaN/inf (with a warning each; the step "
                          "leaves weights, optimizer and method state untouched) instead of stopping at the first"},
    )
    dist_timeout: float = field(
        default=600.0,
        metadata={"help": "seconds a collective waits for the other processes before the run fails (a dead or "
                          "stalled rank then stops every rank instead of hanging them); $INSTDISC_DIST_TIMEOUT "
                          "overrides the default"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "aug": AugmentConfig,
    "run": RunConfig,
}
# Augmentation flags are prefixed (--aug-scale, --aug-blur-p) because "size" or "scale" alone are ambiguous.
PREFIX = {"aug": "aug_"}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    run: RunConfig = field(default_factory=RunConfig)
    method: Any = None  # the method's own Config dataclass instance

    def to_dict(self) -> dict[str, Any]:
        return {name: _to_plain(dataclasses.asdict(getattr(self, name))) for name in [*SECTIONS, "method"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict()` output (a checkpoint's or config.json's)."""
        from instdisc.methods import METHODS

        out = cls()
        for name, dc in SECTIONS.items():
            setattr(out, name, _build(dc, d.get(name, {})))
        mcls = METHODS.get(out.run.method)
        if mcls is None:
            raise ConfigError(f"unknown method {out.run.method!r}; known: {', '.join(METHODS)}")
        out.method = _build(mcls.Config, d.get("method") or {})
        return out


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(dc: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(dc)
    kwargs = {}
    for f in fields(dc):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], f.name)
    unknown = set(values) - {f.name for f in fields(dc)}
    if unknown:
        raise ConfigError(f"unknown keys for {dc.__name__}: {sorted(unknown)}")
    try:
        return dc(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ checks
        raise ConfigError(str(e)) from None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check and convert a YAML/JSON value to the field's type, with a readable error."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} may not be empty")
    origin = typing.get_origin(base)
    try:
        if origin is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"{name} must be one of {list(choices)}; got {value!r}")
            return value
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list; got {value!r}")
            (elem, *_) = typing.get_args(base) or (Any,)
            items = [_coerce(v, elem, name) for v in value]
            return tuple(items) if origin is tuple else items
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{name} must be true or false; got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} must be an integer; got {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be a number; got {value!r}")
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)} ({e})") from None
    return value


def _flag(section: str, name: str) -> str:
    return "--" + (PREFIX.get(section, "") + name).replace("_", "-")


def _dest(section: str, name: str) -> str:
    return f"{section}.{name}"


def _add_fields(parser: argparse.ArgumentParser, section: str, dc: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(dc)
    defaults = dc()
    for f in fields(dc):
        tp, _ = _unwrap_optional(hints[f.name])
        origin = typing.get_origin(tp)
        default = getattr(defaults, f.name)
        help_ = f.metadata.get("help", "")
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_ = f"{help_} (default: {shown})" if help_ else f"(default: {shown})"
        kw: dict[str, Any] = {"dest": _dest(section, f.name), "default": argparse.SUPPRESS, "help": help_}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif origin in (list, tuple):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            kw["type"] = args[0] if args else str
            kw["nargs"] = len(typing.get_args(tp)) if origin is tuple and Ellipsis not in typing.get_args(tp) else "+"
            kw["metavar"] = args[0].__name__.upper() if args else "X"
        else:
            kw["type"] = tp
            kw["metavar"] = f.name.upper()
        group.add_argument(_flag(section, f.name), **kw)


def add_train_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    """All flags of `instdisc train` for the given method."""
    from instdisc.methods import METHODS

    titles = {"data": "data", "model": "model", "optim": "optimisation", "aug": "augmentation", "run": "run"}
    for section, dc in SECTIONS.items():
        _add_fields(parser, section, dc, titles[section])
    _add_fields(parser, "method", METHODS[method].Config, f"{method} (method hyper-parameters)")


def _all_keys(method_cfg: type) -> dict[str, tuple[str, str]]:
    """Flat preset key (as in YAML) -> (section, field)."""
    keys = {}
    for section, dc in [*SECTIONS.items(), ("method", method_cfg)]:
        for f in fields(dc):
            keys[(PREFIX.get(section, "") + f.name)] = (section, f.name)
    return keys


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML preset; keys normalised to underscores."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of flag names to values.")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def resolve(preset: dict[str, Any], flags: dict[str, Any], method: str) -> TrainConfig:
    """defaults <- preset (flat keys) <- flags ('section.field' keys from argparse)."""
    from instdisc.methods import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    mcfg = METHODS[method].Config
    keys = _all_keys(mcfg)
    values: dict[str, dict[str, Any]] = {s: {} for s in [*SECTIONS, "method"]}
    for k, v in preset.items():
        if k not in keys:
            close = difflib.get_close_matches(k, list(keys), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {k!r} for method {method!r}.{hint}")
        section, name = keys[k]
        values[section][name] = v
    for dest, v in flags.items():
        section, name = dest.split(".", 1)
        values[section][name] = v
    values["run"]["method"] = method
    d = dict(values)
    cfg = TrainConfig.from_dict(d)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that do not need the data (those that do live where N is known)."""
    o, r = cfg.optim, cfg.run
    checks = [
        (o.epochs >= 1, f"--epochs must be >= 1; got {o.epochs}"),
        (o.batch_size >= 1, f"--batch-size must be >= 1; got {o.batch_size}"),
        (o.lr > 0, f"--lr must be > 0; got {o.lr}"),
        (0 <= o.momentum < 1, f"--momentum must be in [0, 1); got {o.momentum}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0; got {o.weight_decay}"),
        (0 < o.gamma <= 1, f"--gamma must be in (0, 1]; got {o.gamma}"),
        (o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0; got {o.warmup_epochs}"),
        (cfg.model.width >= 1, f"--width must be >= 1; got {cfg.model.width}"),
        (cfg.data.window >= 0 and cfg.data.stride >= 0, "--window and --stride must be >= 0 (0 = automatic)"),
        (r.knn_k >= 1, f"--knn-k must be >= 1; got {r.knn_k}"),
        (r.knn_t > 0, f"--knn-t must be > 0; got {r.knn_t}"),
        (r.log_every >= 1, f"--log-every must be >= 1; got {r.log_every}"),
        (r.ckpt_every_steps >= 0, f"--ckpt-every-steps must be >= 0; got {r.ckpt_every_steps}"),
        (r.max_steps >= 0, f"--max-steps must be >= 0; got {r.max_steps}"),
        (r.time_limit >= 0 and math.isfinite(r.time_limit),
         f"--time-limit must be a number of minutes >= 0 (0 = no limit); got {r.time_limit}"),
        (r.skip_nonfinite >= 0, f"--skip-nonfinite must be >= 0; got {r.skip_nonfinite}"),
        (r.dist_timeout > 0, f"--dist-timeout must be > 0 seconds; got {r.dist_timeout}"),
    ]
    a = cfg.aug
    checks += [
        (0 < a.scale[0] <= a.scale[1] <= 1, f"--aug-scale must satisfy 0 < min <= max <= 1; got {a.scale}"),
        (a.size >= 1, f"--aug-size must be >= 1; got {a.size}"),
    ]
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        v = getattr(a, name, 0.0)
        checks.append((0 <= v <= 1, f"--aug-{name.replace('_', '-')} must be a probability in [0, 1]; got {v}"))
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg + ".")
