"""The methods: one file each, one plain dict. Adding a method = one file + one line here."""

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

# after METHODS: building looks methods up there
from instdisc.methods.build import build_method, load_run, read_run  # noqa: E402

__all__ = ["METHODS", "EpochContext", "Method", "StepOutput", "build_method", "load_run", "read_run"]
