"""instdisc: visual features from unlabelled images by instance discrimination, and their evaluation.

Reading order: cli.py (what exists) -> engine.py (the loop) -> methods/base.py (the contract)
-> methods/npid.py + memory.py (one whole method) -> knn.py (how we measure).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
