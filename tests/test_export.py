"""instdisc export: every format loads back and gives the instdisc backbone's features.

torchvision and timm cannot be imported on the CPU machine: there the torchvision layout is checked
against torchvision's documented architecture (tests/torchvision_layout.py) and against a forward
pass written from the ResNet paper on the torchvision-named tensors (test_published.ref_resnet); the
strict loads into torchvision/timm themselves run where those import.
"""

import importlib.util
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from test_published import R18, R50, linear, prefixed, ref_resnet, resnet_sd, sela_alexnet_sd
from torchvision_layout import RESNET18, RESNET50

from instdisc.cli import main
from instdisc.evaluate import load_subject
from instdisc.export import detectron2_key, torchvision_key, torchvision_state_dict
from instdisc.models import build_backbone
from instdisc.published import resnet_key

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None


def images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch NPID run (ResNet-18 width 8, CIFAR stem) with a kNN result in eval/."""
    out = tmp_path_factory.mktemp("exportrun") / "run"
    assert main(["train", "--method", "npid", "--data", "synthetic:96", "--out", str(out), "--width", "8",
                 "--batch-size", "32", "--nce-k", "16", "--knn-k", "10", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--milestones", "100"]) == 0
    assert main(["knn", str(out), "-k", "5", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """Released NPID ImageNet weights (lemniscate layout), ResNet-18 width 64 with its 128-d fc."""
    sd = linear(resnet_sd(**R18, seed=3), "fc.", 128, 512)
    path = tmp_path_factory.mktemp("released") / "lemniscate_resnet18.pth"
    torch.save({"state_dict": prefixed(sd, "module."), "epoch": 200, "arch": "resnet18"}, path)
    return path, sd


# ---------------------------------------------------------------------------------------------
# The key tables


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("cifar", [True, False])
def test_torchvision_key_is_the_inverse_of_the_published_table(arch, cifar):
    net, _ = build_backbone(arch, width=4, cifar_stem=cifar)
    keys = list(net.state_dict())
    assert [resnet_key(torchvision_key(k)) for k in keys] == keys
    assert len({torchvision_key(k) for k in keys}) == len(keys)
    with pytest.raises(ValueError, match="not a key"):
        torchvision_key("head.net.weight")


@pytest.mark.parametrize("arch, layout", [("resnet18", RESNET18), ("resnet50", RESNET50)])
def test_torchvision_layout_matches_the_documented_architecture(arch, layout):
    net, _ = build_backbone(arch, width=64, cifar_stem=False)
    sd = torchvision_state_dict(net)
    expected = {k: v for k, v in layout.items() if not k.startswith("fc.")}
    assert len(layout) == {"resnet18": 122, "resnet50": 320}[arch]  # torchvision's state_dict lengths
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


# ---------------------------------------------------------------------------------------------
# torchvision / timm / safetensors


def test_torchvision_export_of_a_run_gives_the_backbone_features(run, tmp_path, capsys):
    out = tmp_path / "r18.pth"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.maxpool = nn.Identity()" in printed and "fc = nn.Identity()" in printed
    sd = torch.load(out, weights_only=True)
    assert "fc.weight" not in sd and "conv1.weight" in sd and sd["conv1.weight"].shape == (8, 3, 3, 3)
    backbone = load_subject(run, device="cpu").backbone
    x = images(4, 32)
    with torch.no_grad():
        ours = backbone(x)
    ref = ref_resnet(sd, x, **R18, cifar=True)
    assert (ref - ours).abs().max() <= 1e-5


def test_released_imagenet_weights_export_to_torchvision_and_timm_unchanged(imagenet_weights, tmp_path):
    path, src = imagenet_weights
    for fmt in ("torchvision", "timm"):
        out = tmp_path / f"{fmt}.pth"
        assert main(["export", str(path), "--format", fmt, "--out", str(out), "--part", "backbone+head"]) == 0
        sd = torch.load(out, weights_only=True)
        assert set(sd) == set(src)  # the released file was torchvision-named, fc included
        assert all(torch.equal(sd[k], src[k]) for k in sd if not k.endswith("num_batches_tracked"))
        card = json.loads((tmp_path / f"{fmt}.pth.card.json").read_text())
        assert card["stem"] == "imagenet" and card["feature_dim"] == 128 and card["input"]["size"] == 224
        assert card["method"] == "npid" and "CVPR 2018" in card["paper"]
        assert any("num_classes=128" in n for n in card["notes"])


def test_resnet50_with_imagenet_stem_through_the_torchvision_layout(tmp_path):
    src = linear(resnet_sd(**R50, width=8, seed=5), "fc.", 16, 256)
    path = tmp_path / "lemniscate_resnet50.pth"
    torch.save({"state_dict": prefixed(src, "module.")}, path)
    out = tmp_path / "r50.pth"
    assert main(["export", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    x = images(2, 64, seed=2)
    with torch.no_grad():
        ours = load_subject(out.parent / "lemniscate_resnet50.pth", device="cpu").backbone(x)
    assert (ref_resnet(sd, x, **R50) - ours).abs().max() <= 1e-5 * max(1.0, float(ours.abs().max()))


def test_backbone_plus_linear_head_is_torchvisions_fc(run, tmp_path):
    out = tmp_path / "head.pth"
    assert main(["export", str(run), "--format", "timm", "--out", str(out), "--part", "backbone+head"]) == 0
    sd = torch.load(out, weights_only=True)
    subject = load_subject(run, device="cpu")
    x = images(3, 32, seed=1)
    with torch.no_grad():
        ours = subject.module.head(subject.backbone(x))  # (B, 128)
    ref = ref_resnet(sd, x, **R18, cifar=True) @ sd["fc.weight"].t() + sd["fc.bias"]
    assert sd["fc.weight"].shape == (128, 64) and (ref - ours).abs().max() <= 1e-5


def test_released_pic_mlp_head_becomes_a_sequential_fc(tmp_path):
    trunk = resnet_sd(**R50, width=8, seed=7)
    enc = linear(linear(dict(trunk), "fc1.", 256, 256, seed=2), "fc2.", 32, 256, seed=3)
    path = tmp_path / "current.pth"
    torch.save({"model": {**prefixed(enc, "module.encoder."), "module.sim_matrix": torch.randn(10, 32)},
                "epoch": 400}, path)
    out = tmp_path / "pic.pth"
    assert main(["export", str(path), "--format", "torchvision", "--part", "backbone+head", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert {k for k in sd if k.startswith("fc.")} == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
    x = images(2, 64, seed=4)
    f = ref_resnet(sd, x, **R50)
    z = torch.relu(f @ enc["fc1.weight"].t() + enc["fc1.bias"]) @ enc["fc2.weight"].t() + enc["fc2.bias"]
    subject = load_subject(path, device="cpu")
    with torch.no_grad():
        ours = subject.module.head(subject.backbone(x))
    assert (z - ours).abs().max() <= 1e-5 * max(1.0, float(z.abs().max()))
    card = json.loads((tmp_path / "pic.pth.card.json").read_text())
    assert card["method"] == "pic" and card["feature_dim"] == 32 and any("MLP" in n for n in card["notes"])


def test_safetensors_holds_the_torchvision_tensors_and_the_stem_change(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert main(["export", str(run), "--format", "torchvision", "--out", str(tmp_path / "a.pth")]) == 0
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "a.safetensors")]) == 0
    tv = torch.load(tmp_path / "a.pth", weights_only=True)
    st = load_file(tmp_path / "a.safetensors")
    assert set(st) == set(tv) and all(torch.equal(st[k], tv[k]) for k in tv)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["stem"] == "cifar" and meta["arch"] == "resnet18" and meta["input_size"] == "32"
    assert json.loads(meta["mean"]) == pytest.approx([0.4914, 0.4822, 0.4465])
    assert any("maxpool = nn.Identity()" in n for n in json.loads(meta["notes"]))


@pytest.mark.torchvision
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not importable here (CPU torch build); runs where it is")
def test_strict_load_into_torchvision(imagenet_weights, tmp_path):
    import torchvision
    from torch import nn

    path, _ = imagenet_weights
    out = tmp_path / "tv.pth"
    assert main(["export", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    m = torchvision.models.resnet18()
    m.fc = nn.Identity()
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = images(2, 224)
    with torch.no_grad():
        assert (m.eval()(x) - load_subject(path, device="cpu").backbone(x)).abs().max() <= 1e-5
    # The CIFAR stem (released NPID cifar.py weights, width 64): the two changes the card names.
    cifar = tmp_path / "ckpt.t7"
    torch.save({"net": prefixed(linear(resnet_sd(**R18, cifar=True, shortcut="shortcut"), "linear.", 128, 512),
                                "module.")}, cifar)
    out = tmp_path / "cifar.pth"
    assert main(["export", str(cifar), "--format", "torchvision", "--out", str(out)]) == 0
    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool, m.fc = nn.Identity(), nn.Identity()
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = images(2, 32)
    with torch.no_grad():
        assert (m.eval()(x) - load_subject(cifar, device="cpu").backbone(x)).abs().max() <= 1e-5


@pytest.mark.torchvision
@pytest.mark.skipif(not HAS_TIMM, reason="timm is not importable here (CPU torch build); runs where it is")
def test_strict_load_into_timm(imagenet_weights, tmp_path):
    import timm

    path, _ = imagenet_weights
    out = tmp_path / "timm.pth"
    assert main(["export", str(path), "--format", "timm", "--out", str(out)]) == 0
    m = timm.create_model("resnet18", num_classes=0, pretrained=False)
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = images(2, 224)
    with torch.no_grad():
        assert (m.eval()(x) - load_subject(path, device="cpu").backbone(x)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# ONNX, torch.export, detectron2


def test_onnx_agrees_with_torch_under_onnxruntime(run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "r18.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    backbone = load_subject(run, device="cpu").backbone
    for n in (1, 6):  # the batch axis is dynamic
        x = images(n, 32, seed=n)
        got = torch.from_numpy(sess.run(["features"], {"images": x.numpy()})[0])
        with torch.no_grad():
            assert got.shape == (n, 64) and (got - backbone(x)).abs().max() <= 1e-4
    card = json.loads((tmp_path / "r18.onnx.card.json").read_text())
    assert card["graph"]["opset"] == 18 and card["check"]["max_abs_diff"] <= 1e-4


def test_torch_export_round_trip(run, tmp_path):
    out = tmp_path / "r18.pt2"
    assert main(["export", str(run), "--format", "torch-export", "--out", str(out), "--part", "backbone+head"]) == 0
    prog = torch.export.load(str(out)).module()
    subject = load_subject(run, device="cpu")
    for n in (2, 5):
        x = images(n, 32, seed=n)
        with torch.no_grad():
            assert (prog(x) - subject.module.head(subject.backbone(x))).abs().max() <= 1e-5


def test_detectron2_pickle_layout(run, tmp_path):
    out = tmp_path / "r18.pkl"
    with pytest.warns(Warning, match="CIFAR stem"):
        assert main(["export", str(run), "--format", "detectron2", "--out", str(out)]) == 0
    obj = pickle.loads(out.read_bytes())
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    d2 = obj["model"]
    assert all(isinstance(v, np.ndarray) for v in d2.values())
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.1.conv2.norm.bias",
            "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean", "res5.1.conv2.weight"} <= set(d2)
    assert not any("num_batches_tracked" in k or "layer" in k or "bn" in k or "downsample" in k for k in d2)
    bb = load_subject(run, device="cpu").backbone
    tv = torchvision_state_dict(bb)
    assert len(d2) == sum(not k.endswith("num_batches_tracked") for k in tv)
    assert np.array_equal(d2["res3.0.shortcut.norm.running_mean"], bb.layer2[0].shortcut[1].running_mean.numpy())
    assert np.array_equal(d2["stem.conv1.norm.weight"], bb.stem[1].weight.detach().numpy())


def test_detectron2_key_table():
    assert detectron2_key("layer4.2.bn3.running_var") == "res5.2.conv3.norm.running_var"
    assert detectron2_key("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert detectron2_key("bn1.num_batches_tracked") is None
    with pytest.raises(ValueError):
        detectron2_key("fc.weight")


# ---------------------------------------------------------------------------------------------
# The model card


def test_model_card_has_the_runs_evaluation(run, tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    card = json.loads((tmp_path / "m.safetensors.card.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert card["training"]["data"] == "synthetic:96" and card["training"]["epochs"] == cfg["optim"]["epochs"] == 1
    assert card["training"]["epochs_completed"] == 1 and card["training"]["steps"] == 3  # 96 images, batch 32
    assert card["arch"] == "resnet18" and card["width"] == 8 and card["stem"] == "cifar"
    assert card["input"]["std"] == pytest.approx(cfg["aug"]["std"]) and card["feature_dim"] == 64
    knn = json.loads((run / "eval" / "knn.json").read_text())
    got = next(e for e in card["evaluation"] if e["protocol"] == "knn")
    assert got["rows"] == knn["rows"]
    final = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in ln][-1]
    assert next(e for e in card["evaluation"] if e["protocol"] == "knn_final")["knn_top1"] == final["knn_top1"]
    md = (tmp_path / "m.safetensors.card.md").read_text()
    assert f"{knn['rows'][0]['top1']:.2f}" in md and "NPID" in md and "maxpool = nn.Identity()" in md


def test_result_files_record_the_instdisc_command(tmp_path, monkeypatch):
    from instdisc.evaluate import save_result

    monkeypatch.setattr(sys, "argv", ["/venv/bin/instdisc", "knn", "runs/a b", "-k", "5"])
    p = save_result(tmp_path, "knn", {"rows": []})
    assert json.loads(p.read_text())["command"] == "instdisc knn 'runs/a b' -k 5"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    p = save_result(tmp_path, "knn", {"rows": []})
    assert "command" not in json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------
# Bad input: status 2 and one clear line


def test_bad_input_exits_2(tmp_path, run, capsys):
    def fails(argv, *needles):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(n in err for n in needles), err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    fails([str(empty), "--format", "torchvision", "--out", str(tmp_path / "x.pth")], "no checkpoint")
    unknown = tmp_path / "unknown.pth"
    torch.save({"blocks.0.weight": torch.zeros(2)}, unknown)
    fails([str(unknown), "--format", "onnx", "--out", str(tmp_path / "x.onnx")], "unknown checkpoint layout")
    alex = tmp_path / "sela_alexnet.pth"
    torch.save({"state_dict": sela_alexnet_sd(width=8, heads=1)}, alex)
    for fmt in ("torchvision", "timm", "detectron2"):
        fails([str(alex), "--format", fmt, "--out", str(tmp_path / "x.bin")], f"--format {fmt}", "alexnet",
              "ResNets only")
    fails([str(alex), "--format", "safetensors", "--out", str(tmp_path / "x.st"), "--part", "backbone+head"],
          "--part backbone+head", "no projection head")
    fails([str(run), "--format", "detectron2", "--part", "backbone+head", "--out", str(tmp_path / "x.pkl")],
          "--part backbone")
    with pytest.raises(SystemExit) as e:  # argparse: usage line and status 2
        main(["export", str(run), "--format", "keras", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'keras'" in capsys.readouterr().err


def test_alexnet_exports_where_the_format_allows(tmp_path):
    from safetensors.torch import load_file

    alex = tmp_path / "sela_alexnet.pth"
    torch.save({"state_dict": sela_alexnet_sd(width=8, heads=1)}, alex)
    assert main(["export", str(alex), "--format", "safetensors", "--out", str(tmp_path / "a.safetensors")]) == 0
    st = load_file(tmp_path / "a.safetensors")
    backbone = load_subject(alex, device="cpu").backbone
    assert set(st) == set(backbone.state_dict())
    net, _ = build_backbone("alexnet", width=8, cifar_stem=False)
    net.load_state_dict(st, strict=True)
    card = json.loads((tmp_path / "a.safetensors.card.json").read_text())
    assert card["method"] == "sela" and card["training"]["data"] is None and card["input"]["size"] == 224
