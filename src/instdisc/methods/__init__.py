"""The methods: one file each, one plain dict. Adding a method = one file + one line here."""

from instdisc.methods.base import EpochContext, Method, StepOutput
from instdisc.methods.npid import NPID

METHODS: dict[str, type[Method]] = {
    "npid": NPID,
}

__all__ = ["METHODS", "EpochContext", "Method", "StepOutput"]
