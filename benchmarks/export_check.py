"""Export one run to every format and check each file the way its consumer would load it.

    python benchmarks/export_check.py RUN --out DIR

- torchvision / timm (where they import): `torchvision.models.<arch>()` / `timm.create_model(arch,
  num_classes=0)`, with the changes the model card lists (CIFAR stem: 3x3 stride-1 conv1, no max-pool;
  a width other than 64: every convolution and BatchNorm re-made at the file's shapes, so that
  the library's own forward code runs on our tensors), `load_state_dict(strict=True)`, pooled
  features against instdisc's backbone (max |difference|, fp32, eval mode).
- safetensors: a ResNet's file holds the torchvision names: its tensors equal the .pth export's; other
  architectures (instdisc's own names) load into a fresh `build_backbone`, features compared.
- ONNX: onnxruntime's output against the backbone; torch.export: the saved program's output.
- detectron2 (not importable here): every key of the pickle is the detectron2 name of one
  torchvision key (`export.detectron2_key`), with the same tensor.
Prints one JSON line per format. Results: docs/export.md, "Checked".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from instdisc.cli import main as cli
from instdisc.evaluate import load_subject
from instdisc.export import FORMATS, detectron2_key


def narrowed(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """The library's model with each Conv2d / BatchNorm2d re-made at the state dict's shapes."""
    for name, mod in list(model.named_modules()):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Conv2d) and f"{name}.weight" in sd:
            w = sd[f"{name}.weight"]
            setattr(parent, leaf, nn.Conv2d(w.shape[1], w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                                            bias=mod.bias is not None))
        elif isinstance(mod, nn.BatchNorm2d) and f"{name}.weight" in sd:
            setattr(parent, leaf, nn.BatchNorm2d(sd[f"{name}.weight"].shape[0]))
    return model


def library_model(lib: str, arch: str, card: dict, sd: dict[str, torch.Tensor]) -> nn.Module:
    if lib == "torchvision":
        import torchvision

        m = getattr(torchvision.models, arch)()
        m.fc = nn.Identity()
    else:
        import timm

        m = timm.create_model(arch, num_classes=0, pretrained=False)
    if card["stem"] == "cifar":  # the card's first listed change
        m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    return narrowed(m, sd)


def check(run: Path, out: Path) -> list[dict]:
    subject = load_subject(run, device="cpu")
    backbone = subject.backbone.eval()
    x = torch.randn(4, 3, subject.size, subject.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = backbone(x).float()
    rows = []
    tv_sd = None
    for fmt, suffix in FORMATS.items():
        path = out / f"model-{fmt}{suffix}"
        rc = cli(["export", str(run), "--format", fmt, "--out", str(path)])
        card = json.loads(path.with_name(path.name + ".card.json").read_text()) if rc == 0 else {}
        row: dict = {"format": fmt, "exit": rc, "bytes": path.stat().st_size if path.exists() else 0}
        if rc != 0:
            rows.append(row)
            continue
        arch = card["arch"]
        if fmt in ("torchvision", "timm"):
            sd = torch.load(path, weights_only=True)
            tv_sd = sd if fmt == "torchvision" else tv_sd
            lib = fmt
            if importlib.util.find_spec(lib) is None:
                row["check"] = f"{lib} not importable here: not loaded"
            else:
                m = library_model(lib, arch, card, sd).eval()
                m.load_state_dict(sd, strict=True)
                with torch.no_grad():
                    row["max_abs_diff"] = float((m(x).float() - ref).abs().max())
                row["check"] = f"{lib} strict load + features"
        elif fmt == "safetensors":
            from safetensors.torch import load_file

            from instdisc.models import build_backbone

            sd = load_file(str(path))
            if card["key_layout"] == "torchvision":  # a ResNet: the torchvision names, as the .pth
                row["same_tensors_as_torchvision_file"] = tv_sd is not None and set(sd) == set(tv_sd) and all(
                    torch.equal(sd[k], tv_sd[k].float() if tv_sd[k].is_floating_point() else tv_sd[k]) for k in sd)
                row["check"] = "tensors equal to the torchvision export's"
            else:
                m = build_backbone(arch, width=card["width"], cifar_stem=card["stem"] == "cifar")[0].eval()
                m.load_state_dict(sd, strict=True)
                with torch.no_grad():
                    row["max_abs_diff"] = float((m(x).float() - ref).abs().max())
                row["check"] = "build_backbone strict load + features"
        elif fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            row["max_abs_diff"] = float((torch.from_numpy(got) - ref).abs().max())
            row["check"] = "onnxruntime vs backbone"
        elif fmt == "torch-export":
            prog = torch.export.load(str(path))
            with torch.no_grad():
                row["max_abs_diff"] = float((prog.module()(x).float() - ref).abs().max())
            row["check"] = "torch.export.load program vs backbone"
        else:  # detectron2
            with open(path, "rb") as fh:
                d2 = pickle.load(fh)["model"]
            assert tv_sd is not None
            want = {detectron2_key(k): v for k, v in tv_sd.items() if detectron2_key(k) is not None}
            row["keys"] = len(d2)
            row["same_tensors"] = set(d2) == set(want) and all(
                torch.equal(torch.as_tensor(d2[k]), want[k]) for k in d2)
            row["check"] = "keys = detectron2_key(torchvision keys), tensors equal (detectron2 not importable)"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0],
                      **{m: __import__(m).__version__ for m in ("torchvision", "timm", "onnxruntime")
                         if importlib.util.find_spec(m)}}))
    for row in check(Path(a.run), out):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
