"""The methods: one file each, one plain dict. Adding a method = one file + one line here."""

from typing import Any

from instdisc.config import TrainConfig, resolve
from instdisc.errors import ConfigError
from instdisc.methods.base import EpochContext, Method, StepOutput
from instdisc.methods.moco import MoCo
from instdisc.methods.npid import NPID
from instdisc.methods.pic import PIC
from instdisc.methods.sela import SeLa
from instdisc.methods.simclr import SimCLR
from instdisc.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "npid": NPID,
    "moco": MoCo,
    "simclr": SimCLR,
    "pic": PIC,
    "sela": SeLa,
    "supervised": Supervised,
}



def method_config(name: str) -> type:
    """The Config dataclass of method `name` (its fields are the method's flags)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[name].Config


def resolve_config(preset: dict[str, Any], flags: dict[str, Any], name: str) -> TrainConfig:
    """A run's configuration: defaults <- preset <- flags (`config.resolve`) for method `name`."""
    return resolve(preset, flags, name, method_config(name))


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A stored configuration (config.json, a checkpoint's "config") back into a TrainConfig."""
    return TrainConfig.from_dict(d, method_config((d.get("run") or {}).get("method", "npid")))


# after METHODS: building looks methods up there
from instdisc.methods.build import build_method, load_run, read_run  # noqa: E402

__all__ = ["METHODS", "EpochContext", "Method", "StepOutput", "build_method", "config_from_dict", "load_run",
           "method_config", "read_run", "resolve_config"]
