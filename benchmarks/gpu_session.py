"""The parts of the prepared GPU session (benchmarks/gpu_session.sh runs them in order).

Each part writes one JSON file; none of them stops the others when it fails.

  device    versions of the machine, driver, torch (part a)
  methods   every method in METHODS (and the variants with CUDA-only code paths) for a few steps,
            one process each, so a CUDA failure in one cannot hide the others (part c)
  plan      from the throughput probes (benchmarks/loader_throughput.py, one per batch size), the
            batch size and the number of epochs of NPID's CIFAR-10 recipe that fit the time left
  summary   one table of everything under OUT (summary.json, summary.md)

The recipe (part d/e) is the NPID seed's CIFAR command: full softmax, tau 0.1, ResNet-18 CIFAR stem,
lr 0.03 at batch 128 with steps at 60% and 80% of the schedule (120/160 of 200 epochs). A larger
batch scales the lr linearly; a schedule that does not fit is compressed to E epochs, milestones
scaled with it, and reported as an E-epoch result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"

# name -> flags. Every method in METHODS appears at least once (tests/test_gpu_session.py); the
# variants run the code that only some settings reach (sampled PIC rows on the host, MoCo's
# shuffled BatchNorm, NPID's full softmax).
SMOKES: dict[str, list[str]] = {
    "npid": ["--config", str(CONFIGS / "npid_cifar10.yaml")],
    "npid-full-softmax": ["--config", str(CONFIGS / "npid_cifar10_softmax.yaml")],
    "moco": ["--config", str(CONFIGS / "moco_cifar10.yaml")],
    "simclr": ["--config", str(CONFIGS / "simclr_cifar10.yaml")],
    "pic": ["--config", str(CONFIGS / "pic_cifar10.yaml")],
    "pic-sampled-host-rows": ["--config", str(CONFIGS / "pic_cifar10.yaml"), "--queue-size", "4096", "--rows-on", "host"],
    "sela": ["--config", str(CONFIGS / "sela_cifar10.yaml")],
    "supervised": ["--method", "supervised", "--num-classes", "10", "--arch", "resnet18", "--width", "64"],
}

RECIPE = CONFIGS / "npid_cifar10_softmax.yaml"
RECIPE_BATCH, RECIPE_LR, RECIPE_EPOCHS = 128, 0.03, 200
MILESTONES = (0.6, 0.8)  # 120 and 160 of 200 epochs


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


def part_device(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    for mod in ("torchvision", "timm", "onnxruntime", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - any import failure is a fact worth recording
            info[mod] = f"not importable: {type(e).__name__}"
    write_json(Path(args.json), info)
    return 0


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def smoke_argv(name: str, data: str, run: str, steps: int, device: str, precision: str, extra: list[str]) -> list[str]:
    """The `instdisc train` arguments of one smoke run."""
    return ["train", *SMOKES[name], "--data", data, "--out", run, "--overwrite", "--epochs", "1",
            "--max-steps", str(steps), "--knn-every", "0", "--device", device, "--precision", precision,
            "--no-progress", *extra]


def part_methods(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    names = args.only.split(",") if args.only else list(SMOKES)
    for name in names:
        run = Path(args.runs) / f"smoke_{name}"
        cmd = [sys.executable, "-m", "instdisc",
               *smoke_argv(name, args.data, str(run), args.steps, args.device, args.precision, args.extra)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (Path(args.logs) / f"c_{name}.log").write_text(proc.stdout + proc.stderr)
        recs = _metrics(run)
        part = [r for r in recs if r.get("type") in ("epoch", "epoch_part")]
        last = part[-1] if part else {}
        loss = last.get("loss")
        results[name] = {
            "rc": proc.returncode, "wall_s": round(wall, 1), "steps": last.get("step"),
            "loss": loss, "finite": loss is not None and math.isfinite(loss),
            "img_per_s": last.get("img_per_s"),
            "ok": proc.returncode == 0 and loss is not None and math.isfinite(loss) and last.get("step") == args.steps,
            "error": None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:500],
        }
        print(f"{name}: {results[name]}", flush=True)
    write_json(Path(args.json), {"device": args.device, "steps": args.steps, "methods": results,
                                 "all_ok": all(r["ok"] for r in results.values())})
    return 0 if all(r["ok"] for r in results.values()) else 1


def choose_batch(rates: dict[int, float], tolerance: float = 0.9) -> int:
    """The smallest batch size within `tolerance` of the fastest: the recipe's batch unless a larger
    one is clearly faster (a larger batch changes the optimisation, so it must pay for itself)."""
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= tolerance * best)


def plan_schedule(rate: float, images: int, train_s: float, *, max_epochs: int = RECIPE_EPOCHS) -> int:
    """Whole epochs of `images` that `rate` img/s trains in `train_s` seconds, at most max_epochs."""
    return max(0, min(max_epochs, int(rate * train_s // images)))


def part_plan(args: argparse.Namespace) -> int:
    rates: dict[int, float] = {}
    images = 0
    for path in args.probes:
        p = json.loads(Path(path).read_text())
        rates[int(p["batch_size"])] = float(p["in_memory"]["train_img_per_s"])
        images = int(p["images"])
    if not rates:
        print("plan: no throughput probe succeeded", file=sys.stderr)
        return 1
    batch = choose_batch(rates)
    train_s = args.first_train_s + args.resume_train_s
    # The probes run eagerly and without per-epoch work (kNN monitor, checkpoints): compiled training
    # is usually faster, the per-epoch work slower; `--safety` keeps the plan on the side that finishes.
    epochs = plan_schedule(rates[batch] * args.safety, images, train_s, max_epochs=args.max_epochs)
    if epochs < 1:
        print(f"plan: not one epoch fits ({rates[batch]:.0f} img/s x {train_s:.0f} s < {images} images)", file=sys.stderr)
        return 1
    lr = RECIPE_LR * batch / RECIPE_BATCH
    milestones = [max(1, round(f * epochs)) for f in MILESTONES]
    flags = ["--batch-size", str(batch), "--lr", f"{lr:g}", "--epochs", str(epochs),
             "--milestones", *map(str, milestones)]
    write_json(Path(args.json), {
        "probe_train_img_per_s": rates, "batch_size": batch, "lr": lr, "epochs": epochs, "milestones": milestones,
        "images": images, "planned_train_s": train_s, "safety": args.safety, "first_train_s": args.first_train_s,
        "resume_train_s": args.resume_train_s, "full_schedule": epochs == RECIPE_EPOCHS, "flags": flags,
    })
    Path(args.flags_out).write_text(" ".join(flags) + "\n")
    return 0


def part_summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"}
    lines = ["# GPU session summary", ""]
    dev = parts.get("a_device", {})
    lines.append(f"device: {dev.get('device_name', dev.get('machine'))}, torch {dev.get('torch')}, "
                 f"driver/smi: {dev.get('nvidia_smi')}")
    tests = parts.get("b_tests", {})
    lines.append(f"gpu/torchvision tests: rc {tests.get('rc')} ({tests.get('summary', '')})")
    meth = parts.get("c_methods", {}).get("methods", {})
    lines += ["", "| smoke | ok | steps | loss | img/s | wall s | error |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in meth.items():
        lines.append(f"| {name} | {r['ok']} | {r['steps']} | {r['loss']} | {r['img_per_s']} | {r['wall_s']} | {r['error'] or ''} |")
    plan = parts.get("plan", {})
    lines += ["", f"plan: {plan.get('flags')} (probe img/s by batch: {plan.get('probe_train_img_per_s')})"]
    for key in ("d_npid", "e_npid_final"):
        r = parts.get(key)
        if r:
            lines.append(
                f"{key}: epochs {r.get('epochs_done')}/{r.get('epochs')} complete={r.get('complete')} "
                f"train {r.get('train_s', 0) / 60:.1f} min, {r.get('train_img_per_s', 0):.0f} img/s, peak "
                f"{r.get('peak_memory_mib', 0):.0f} MiB, kNN top-1 {r.get('knn_top1')} top-5 {r.get('knn_top5')}"
            )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(parts, indent=2) + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("device", help="part a: machine, driver and library versions")
    p.add_argument("--json", required=True)
    p.set_defaults(fn=part_device)
    p = sub.add_parser("methods", help="part c: every method for a few steps, one process each")
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", default="runs")
    p.add_argument("--only", default="", help="comma-separated subset of the smokes (the CPU rehearsal)")
    p.add_argument("--logs", required=True, help="folder for one log per method")
    p.add_argument("--json", required=True)
    p.add_argument("extra", nargs="*", help="more `instdisc train` flags for every method (after --)")
    p.set_defaults(fn=part_methods)
    p = sub.add_parser("plan", help="batch size and epochs of the NPID run from the throughput probes")
    p.add_argument("--probes", nargs="*", default=[])
    p.add_argument("--first-train-s", type=float, required=True, help="training seconds left in this command")
    p.add_argument("--resume-train-s", type=float, required=True, help="training seconds of the resume command")
    p.add_argument("--safety", type=float, default=0.85, help="fraction of the probed img/s the plan counts on")
    p.add_argument("--max-epochs", type=int, default=RECIPE_EPOCHS, help="the recipe's epochs (a rehearsal: fewer)")
    p.add_argument("--json", required=True)
    p.add_argument("--flags-out", required=True, help="file that receives the chosen `instdisc train` flags")
    p.set_defaults(fn=part_plan)
    p = sub.add_parser("summary", help="one table of every part's JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=part_summary)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
