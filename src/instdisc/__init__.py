"""instdisc: visual features from unlabelled images by instance discrimination, and their evaluation.

Reading order: cli.py (what exists) -> engine.py (the loop) -> methods/base.py (the contract)
-> methods/npid.py + memory.py (one whole method) -> knn.py (how we measure).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "embed", "load"]


def __getattr__(name: str) -> Any:
    # `import instdisc` stays cheap (no torch) until the API is used: instdisc.load, instdisc.embed.
    if name in ("load", "embed", "Encoder", "Embedding"):
        from instdisc import api

        return getattr(api, name)
    raise AttributeError(f"module 'instdisc' has no attribute {name!r}")
