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
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from instdisc.augment import AugmentConfig
from instdisc.errors import ConfigError, InstdiscWarning
from instdisc.loggers import check_loggers


@dataclass
class DataConfig:
    data: str = field(
        default="digits",
        metadata={"resume": "change", "help": "digits | synthetic[:N] | cifar10 | cifar100 | a folder | a .tar/.tar.gz/.zip archive",
                  "path": "source"},
    )
    test_data: str | None = field(
        default=None, metadata={"help": "evaluation source (default: the test split of --data)", "path": "source"}
    )
    drop_unknown_classes: bool = field(
        default=False,
        metadata={"resume": "change", "help": "leave out evaluation images whose class the training split does not have (their "
                          "count is printed) instead of refusing the evaluation split"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"resume": "launch", "help": "decoded-image cache (default $INSTDISC_CACHE or ~/.cache/instdisc)", "path": "file"},
    )
    download: bool = field(default=False, metadata={"help": "download CIFAR from its official URL if absent"})
    image_size: int | None = field(
        default=None, metadata={"help": "side of the stored images, made square by a short-side resize and a centre crop "
                                         "(default: small images keep their size; large images are not squared: each "
                                         "training view is cropped from the whole image, evaluation resizes to 256/224 "
                                         "of --aug-size and centre-crops)"}
    )
    workers: int = field(default=4, metadata={"resume": "launch", "help": "decoding workers for streamed (large-image) sources"})
    in_memory: bool = field(
        default=True,
        metadata={"resume": "change", "help": "hold a small-image training set as one uint8 tensor on the training device (batches "
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
    epochs: int = field(default=200, metadata={"resume": "change", "help": "training epochs"})
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
        metadata={"resume": "change", "help": "SGD kernels (same maths, other rounding): auto = torch's choice (foreach on GPU), "
                          "plain, foreach (multi-tensor), fused (one kernel; fastest on GPU). Methods with their "
                          "own optimiser (PIC's sampled rows) ignore it"},
    )


@dataclass
class RunConfig:
    method: str = field(default="npid", metadata={"help": "the method to train: a key of instdisc.methods.METHODS"})
    out: str = field(default="runs/default", metadata={"resume": "launch", "help": "run directory", "path": "file"})
    seed: int = field(default=0, metadata={"help": "seed of all randomness (model init, data order, augmentation)"})
    device: str = field(default="auto", metadata={"resume": "launch", "help": "auto | cpu | cuda | cuda:N"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "autocast dtype of the networks (similarities, logits and losses stay fp32); auto = bf16 "
                          "on a CUDA GPU that has it (else fp16), fp32 on CPU (bf16 measured slower on CPUs without "
                          "AMX; --precision bf16 forces it)"},
    )
    channels_last: bool = field(default=True, metadata={"help": "NHWC memory format (faster convs on CPU and GPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU)"})
    knn_every: int = field(default=1, metadata={"resume": "change", "help": "run the kNN monitor every N epochs (0 = only at the end)"})
    knn_subset: int = field(default=0, metadata={"resume": "change", "help": (
        "for methods without a memory bank: the kNN monitor's train side is a fixed random subset of this "
        "many training images instead of the whole set re-embedded (0 = all; the final kNN uses all)")})
    quality_subset: int | None = field(default=None, metadata={"resume": "change", "help": (
        "label-free quality signals (alignment, uniformity, RankMe, neighbour agreement; docs/quality.md) "
        "on a fixed subset of this many training images, at the kNN monitor's cadence, also without "
        "labels; 0 = off; default N // 20 within [256, 2000] (about 3%% of an epoch's compute)")})
    logger: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"resume": "change", "help": (
        "where metrics are mirrored besides metrics.jsonl (the record): tensorboard (RUN/tb, when the package "
        "is installed), wandb (offline unless WANDB_MODE says otherwise), mlflow (MLFLOW_TRACKING_URI, else "
        "RUN/mlruns); several may be given; none = metrics.jsonl only. docs/loggers.md")})
    knn_k: int = field(default=200, metadata={"help": "neighbours of the kNN monitor (NPID: 200)"})
    knn_t: float = field(default=0.07, metadata={"help": "temperature of the kNN weights exp(s/t)"})
    log_every: int = field(default=20, metadata={"resume": "change", "help": "steps between metric lines"})
    ckpt_every_steps: int = field(default=0, metadata={"resume": "change", "help": "also checkpoint every N steps (0 = per epoch only)"})
    ckpt_every_epochs: int = field(
        default=1,
        metadata={"resume": "change", "help": "checkpoint after every N-th epoch, and always after the last one and at any stop "
                          "(--time-limit, --max-steps, a signal); N > 1 saves time when epochs take seconds "
                          "(CIFAR on a GPU), at the cost of redoing up to N epochs after a crash"},
    )
    max_steps: int = field(default=0, metadata={"resume": "launch", "help": "stop after this many steps in total (0 = no limit)"})
    time_limit: float = field(
        default=0.0,
        metadata={"resume": "change", "help": "minutes of wall time after which the run checkpoints at the next step boundary and "
                          "exits with status 0; --resume continues it (chains a long run into fixed-length "
                          "jobs; leave a minute's margin for the last step and the save). 0 = no limit"},
    )
    skip_nonfinite: int = field(
        default=0,
        metadata={"resume": "change", "help": "skip up to N steps whose loss or gradient is NaN/inf (with a warning each; the step "
                          "leaves weights, optimizer and method state untouched) instead of stopping at the first"},
    )
    dist_timeout: float = field(
        default=600.0,
        metadata={"resume": "launch", "help": "seconds a collective waits for the other processes before the run fails (a dead or "
                          "stalled rank then stops every rank instead of hanging them); $INSTDISC_DIST_TIMEOUT "
                          "overrides the default"},
    )
    progress: bool = field(default=True, metadata={"resume": "launch", "help": "show a progress bar"})


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "aug": AugmentConfig,
    "run": RunConfig,
}


def resume_rules() -> dict[str, str]:
    """"section.name" -> what ``--resume`` does with a flag of this launch (field metadata "resume").

    "launch": the field describes this launch, not the run (device, workers, progress, an early
    stop): always this command line's. "change": may be changed on purpose (``--epochs`` to extend a
    run; ``--data`` for the same images at another path, whose fingerprint the loop compares): this
    command line's when given. Every other field is the run's own: a resume that would change it is
    refused (`instdisc.rundir.resume_config`)."""
    return {f"{sec}.{f.name}": f.metadata["resume"] for sec, cls in SECTIONS.items() for f in fields(cls)
            if "resume" in f.metadata}
SEED_MAX = 2**32 - 1  # numpy's limit on seeds (torch's is larger): every --seed is checked against it

# Augmentation flags are prefixed (--aug-scale, --aug-blur-p) because "size" or "scale" alone are ambiguous.
PREFIX = {"aug": "aug_"}
# AugmentConfig is a plain dataclass of the augmentation module (documented there, field by field);
# the help of its flags lives here, where the flags are made.
AUG_HELP = {
    "size": "side of the square crops fed to the network, in pixels (32 for CIFAR, 224 for ImageNet)",
    "scale": "area range of the random resized crop, as fractions of the image (NPID/MoCo/PIC 0.2 1; SimCLR 0.08 1)",
    "ratio": "aspect-ratio range (width / height) of the crop, drawn log-uniformly",
    "flip_p": "probability of a horizontal flip",
    "jitter_p": "probability of colour jitter (MoCo v2, SimCLR, PIC: 0.8; NPID applied it always: 1)",
    "brightness": "brightness factor drawn from [1 - b, 1 + b]",
    "contrast": "contrast factor drawn from [1 - c, 1 + c]",
    "saturation": "saturation factor drawn from [1 - s, 1 + s]",
    "hue": "hue shift drawn from [-h, h] turns of the colour wheel, h <= 0.5 (NPID 0.4, MoCo v2 0.1)",
    "grayscale_p": "probability of converting to greyscale",
    "blur_p": "probability of a Gaussian blur (MoCo v2/PIC 0.5; off for 32-px images)",
    "blur_sigma": "range of the blur's standard deviation in pixels",
    "solarize_p": "probability of solarising (inverting pixels >= 0.5)",
    "mean": "per-channel mean of the input normalisation (0..1 units)",
    "std": "per-channel standard deviation of the input normalisation",
}


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
    def from_dict(cls, d: dict[str, Any], method_config: type) -> TrainConfig:
        """Rebuild from `to_dict()` output (a checkpoint's or config.json's); `method_config` is the
        method's own Config dataclass (`instdisc.methods.config_from_dict` looks it up by name)."""
        out = cls()
        for name, dc in SECTIONS.items():
            setattr(out, name, _build(dc, d.get(name, {}), prefix=PREFIX.get(name, "")))
        out.method = _build(method_config, d.get("method") or {})
        return out


def absolute_paths(cfg: TrainConfig) -> None:
    """Make every path of `cfg` absolute, in place (fields marked ``"path"`` in their metadata;
    a source spec that names a built-in source stays as it is). A run stores its paths resolved,
    so that ``--resume`` and the evaluation commands find its data from any working directory."""
    from instdisc.sources import canonical_spec

    for name in [*SECTIONS, "method"]:
        section = getattr(cfg, name)
        if section is None:
            continue
        for f in fields(section):
            kind, value = f.metadata.get("path"), getattr(section, f.name)
            if kind is None or not isinstance(value, str) or not value:
                continue
            setattr(section, f.name, canonical_spec(value) if kind == "source" else str(Path(value).expanduser().resolve()))


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(dc: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(dc)
    kwargs = {}
    for f in fields(dc):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], "--" + (prefix + f.name).replace("_", "-"))
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
    """Check and convert a YAML/JSON value to the field's type, with a readable error naming the
    flag (`name`, e.g. "--aug-size"). No field takes NaN or infinity: a non-finite lr, temperature
    or probability would train (or evaluate) to a plausible-looking but meaningless number."""
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
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number; got {value!r}")
            return number
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
        help_ = f.metadata.get("help") or (AUG_HELP.get(f.name, "") if section == "aug" else "")
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
            if isinstance(default, (list, tuple)) else default
        if "default" in help_.lower() or (default is None and f.metadata.get("auto")):
            pass  # the help says it already (in words): not twice
        elif default is None:
            help_ = f"{help_} (default: none)"
        else:
            help_ = f"{help_} (default: {shown})"
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


def add_train_arguments(parser: argparse.ArgumentParser, method: str, method_config: type) -> None:
    """All flags of `instdisc train` for the given method (`method_config`: its Config dataclass)."""
    titles = {"data": "data", "model": "model", "optim": "optimisation", "aug": "augmentation", "run": "run"}
    for section, dc in SECTIONS.items():
        _add_fields(parser, section, dc, titles[section])
    _add_fields(parser, "method", method_config, f"{method} (method hyper-parameters)")


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
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of flag names to values.")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def resolve(preset: dict[str, Any], flags: dict[str, Any], method: str, method_config: type) -> TrainConfig:
    """defaults <- preset (flat keys) <- flags ('section.field' keys from argparse).

    `method_config` is the method's Config dataclass (`instdisc.methods.resolve_config` passes it).
    """
    keys = _all_keys(method_config)
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
    cfg = TrainConfig.from_dict(d, method_config)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that do not need the data (those that do live where N is known)."""
    o, r = cfg.optim, cfg.run
    # A method's Config may say the smallest batch its objective is defined for (SimCLR: 2).
    min_batch = getattr(type(cfg.method), "min_batch_size", 1)
    checks = [
        (0 <= r.seed <= SEED_MAX, f"--seed must be in [0, 2**32 - 1]; got {r.seed}"),
        (o.batch_size >= min_batch,
         f"--batch-size must be >= {min_batch} for --method {r.method} (each image's negatives are the other "
         f"images of the batch: with fewer there are none and the loss is 0); got {o.batch_size}"),
        (cfg.data.workers >= 0, f"--workers must be >= 0 (0 = decode in the main process); got {cfg.data.workers}"),
        (cfg.data.image_size is None or cfg.data.image_size >= 1,
         f"--image-size must be >= 1; got {cfg.data.image_size}"),
        (o.epochs >= 1, f"--epochs must be >= 1; got {o.epochs}"),
        (o.batch_size >= 1, f"--batch-size must be >= 1; got {o.batch_size}"),
        (o.lr > 0, f"--lr must be > 0; got {o.lr}"),
        (0 <= o.momentum < 1, f"--momentum must be in [0, 1); got {o.momentum}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0; got {o.weight_decay}"),
        (0 < o.gamma <= 1, f"--gamma must be in (0, 1]; got {o.gamma}"),
        (o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0; got {o.warmup_epochs}"),
        (cfg.model.width >= 1, f"--width must be >= 1; got {cfg.model.width}"),
        (all(m >= 1 for m in o.milestones), f"--milestones are epoch numbers >= 1; got {o.milestones}"),
        (cfg.data.window >= 0 and cfg.data.stride >= 0, "--window and --stride must be >= 0 (0 = automatic)"),
        (r.knn_every >= 0, f"--knn-every must be >= 0 (0 = only at the end); got {r.knn_every}"),
        (r.knn_k >= 1, f"--knn-k must be >= 1; got {r.knn_k}"),
        (r.knn_subset >= 0, f"--knn-subset must be >= 0 (0 = the whole training set); got {r.knn_subset}"),
        (r.knn_t > 0, f"--knn-t must be > 0; got {r.knn_t}"),
        (r.quality_subset is None or r.quality_subset == 0 or r.quality_subset >= 2,
         f"--quality-subset must be 0 (off) or >= 2 images; got {r.quality_subset}"),
        (r.log_every >= 1, f"--log-every must be >= 1; got {r.log_every}"),
        (r.ckpt_every_steps >= 0, f"--ckpt-every-steps must be >= 0; got {r.ckpt_every_steps}"),
        (r.ckpt_every_epochs >= 1, f"--ckpt-every-epochs must be >= 1; got {r.ckpt_every_epochs}"),
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
    check_loggers(r.logger)  # unknown names, and wandb / mlflow asked for but not installed
    late = [m for m in o.milestones if m >= o.epochs]
    if o.schedule == "step" and late:
        warnings.warn(
            f"--milestones {' '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not before --epochs "
            f"{o.epochs}: the step schedule never drops there (the lr stays {o.lr:g}"
            + (f" x {o.gamma:g} per earlier milestone" if len(late) < len(o.milestones) else "")
            + "). Give milestones below --epochs, or --schedule cosine.",
            InstdiscWarning, stacklevel=2,
        )
