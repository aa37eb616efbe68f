"""Result files: every protocol writes RUN_DIR/eval/NAME.json (`save_result`), which the report
reads back (`load_results`); `format_table` prints rows for the command line.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _command() -> str | None:
    """This process's command line when it is the `instdisc` program (model cards cite it)."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if prog is not None and (prog.name == "instdisc" or (prog.name == "__main__.py" and prog.parent.name == "instdisc")):
        return shlex.join(["instdisc", *sys.argv[1:]])
    return None


def save_result(save_dir: Path | None, name: str, payload: dict[str, Any]) -> Path | None:
    """Write save_dir/NAME.json (the report reads these); no-op without a directory.

    The file also records the command that produced it (``"command"``) when it runs as the
    `instdisc` program; called from Python, there is no command to record.
    """
    from instdisc.checkpoint import atomic_write_text

    if save_dir is None:
        return None
    command = _command()
    if command is not None and "command" not in payload:
        payload = {**payload, "command": command}
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / f"{name}.json"
    atomic_write_text(path, json.dumps({"protocol": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload},
                                       indent=2))
    return path


def load_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every RUN_DIR/eval/*.json written by `save_result`, by protocol name. A result written
    before the run's current checkpoint gets "stale": True (it measured an older model)."""
    from instdisc.checkpoint import LAST, PREV, checkpoint_dir

    out = {}
    d = Path(run_dir) / "eval"
    ckpts = [p.stat().st_mtime_ns for p in (checkpoint_dir(run_dir) / LAST, checkpoint_dir(run_dir) / PREV)
             if p.is_file()]
    newest = max(ckpts, default=None)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            res = json.loads(p.read_text())
            written = p.stat().st_mtime_ns
        except (ValueError, OSError):
            continue
        if isinstance(res, dict):
            out[p.stem] = {**res, "stale": newest is not None and written < newest}
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of `rows` (floats with 2 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
