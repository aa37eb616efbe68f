"""One data preparer per node (`instdisc.sources.pernode`), with two real gloo processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from gloo import free_port, init_gloo, leave_gloo
from PIL import Image

pytestmark = pytest.mark.dist


def image_folder(root: Path, bad: str | None = None) -> Path:
    """train/ and test/ of two classes, 8x8 PNGs (small: decoded into the array cache)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for i in range(n):
            p = root / split / f"c{i % 2}" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    if bad:
        (root / bad).write_bytes(b"not a png")
    return root


def _open_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    from instdisc.engine import open_sets
    from instdisc.methods import resolve_config
    from instdisc.sources import opening

    init_gloo(rank, world, port)
    decoded: list[str] = []
    real = opening._decode_to_array
    opening._decode_to_array = lambda tree, sel, *a, **kw: decoded.append(sel.where) or real(tree, sel, *a, **kw)
    cfg = resolve_config({"data": data, "cache_dir": f"{out}/cache", "device": "cpu"}, {}, "npid")
    train, test = open_sets(cfg)
    np.savez(f"{out}/sets{rank}.npz", train=np.asarray(train.images), train_labels=train.labels,
             test=np.asarray(test.images), test_labels=test.labels)
    with open(f"{out}/decoded{rank}.json", "w") as f:
        json.dump(decoded, f)
    leave_gloo()


def test_one_process_per_node_decodes_and_every_rank_gets_the_same_sets(tmp_path):
    data = image_folder(tmp_path / "ds")
    mp.spawn(_open_worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    decoded = [json.loads((tmp_path / f"decoded{r}.json").read_text()) for r in (0, 1)]
    # rank 0 (the first of this host) decoded both splits, rank 1 only opened the cache it wrote
    assert decoded == [[str(data / "train"), str(data / "test")], []]
    a, b = (np.load(tmp_path / f"sets{r}.npz") for r in (0, 1))
    assert a["train"].shape == (6, 8, 8, 3) and a["test"].shape == (4, 8, 8, 3)
    for k in ("train", "train_labels", "test", "test_labels"):
        np.testing.assert_array_equal(a[k], b[k])


def test_a_failing_preparer_stops_every_rank_with_exit_2_naming_the_file(tmp_path):
    data = image_folder(tmp_path / "ds", bad="train/c1/broken.png")
    port = str(free_port())
    cmd = [sys.executable, "-m", "instdisc", "train", "--method", "npid", "--data", str(data), "--out",
           str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu",
           "--width", "4", "--epochs", "1", "--batch-size", "2", "--nce-k", "2"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert time.monotonic() - start < 60  # not a wait for a collective timeout
    for out in outs:
        assert "broken.png" in out and "Traceback" not in out, out
    assert "found by rank 0" in outs[1]
