"""Train-step speed of the backbone (forward + backward + SGD) per width, precision and memory
format, and the batched augmentation's throughput: the measurements behind `--precision auto`.

  python benchmarks/model_speed.py [--widths 16 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from instdisc.augment import AugmentConfig, augment
from instdisc.models import build_backbone


def img_per_s(fn, batch: int, steps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    b = args.batch_size
    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": b}
    x8 = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    res["augment_npid_img_s"] = round(img_per_s(lambda: augment(x8, AugmentConfig(), g), 256, 20))
    for w in args.widths:
        for prec in ("fp32", "bf16"):
            for fmt in ("nchw", "channels_last"):
                torch.manual_seed(0)
                m, _ = build_backbone("resnet18", width=w)
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                x = torch.randn(b, 3, 32, 32)
                if fmt == "channels_last":
                    m = m.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)

                def step(m=m, opt=opt, x=x, prec=prec):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                        loss = m(x).float().pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

                res[f"w{w}_{prec}_{fmt}_img_s"] = round(img_per_s(step, b, args.steps))
                print(f"width {w} {prec} {fmt}: {res[f'w{w}_{prec}_{fmt}_img_s']} img/s", flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
