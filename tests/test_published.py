"""Released checkpoints of NPID, PIC and SeLa: key layouts built as their code writes them
(docs/evaluation.md), mapped into our backbones, and checked against a forward pass written from
the ResNet paper directly on the source tensors."""

import argparse
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from instdisc.cli import main
from instdisc.errors import CheckpointError
from instdisc.models import ARCHS
from instdisc.published import (
    LAYOUTS,
    Placeholder,
    PublishedModel,
    convert,
    detect_layout,
    load_published,
    read_weights,
)

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _bn(sd, p, c, g, counters):
    sd[p + "weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[p + "bias"] = 0.1 * torch.randn(c, generator=g)
    sd[p + "running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[p + "running_var"] = 0.5 + torch.rand(c, generator=g)
    if counters:
        sd[p + "num_batches_tracked"] = torch.tensor(1000)


def _conv(sd, key, c_out, c_in, k, g):
    sd[key] = torch.randn(c_out, c_in, k, k, generator=g) * (2.0 / (c_in * k * k)) ** 0.5


def resnet_sd(*, bottleneck, layers, width=64, cifar=False, shortcut="downsample", counters=True, seed=0):
    """A torchvision-named ResNet trunk (conv1, bn1, layerL.B.{conv,bn}N, downsample/shortcut.{0,1})."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _conv(sd, "conv1.weight", width, 3, 3 if cifar else 7, g)
    _bn(sd, "bn1.", width, g, counters)
    exp = 4 if bottleneck else 1
    c_in = width
    for li, n in enumerate(layers):
        planes = width * 2**li
        for b in range(n):
            p = f"layer{li + 1}.{b}."
            stride = 2 if li > 0 and b == 0 else 1
            if bottleneck:
                _conv(sd, p + "conv1.weight", planes, c_in, 1, g)
                _bn(sd, p + "bn1.", planes, g, counters)
                _conv(sd, p + "conv2.weight", planes, planes, 3, g)
                _bn(sd, p + "bn2.", planes, g, counters)
                _conv(sd, p + "conv3.weight", planes * 4, planes, 1, g)
                _bn(sd, p + "bn3.", planes * 4, g, counters)
            else:
                _conv(sd, p + "conv1.weight", planes, c_in, 3, g)
                _bn(sd, p + "bn1.", planes, g, counters)
                _conv(sd, p + "conv2.weight", planes, planes, 3, g)
                _bn(sd, p + "bn2.", planes, g, counters)
            if stride != 1 or c_in != planes * exp:
                _conv(sd, p + f"{shortcut}.0.weight", planes * exp, c_in, 1, g)
                _bn(sd, p + f"{shortcut}.1.", planes * exp, g, counters)
            c_in = planes * exp
    return sd


def ref_resnet(sd, x, *, bottleneck, layers, cifar=False, shortcut="downsample"):
    """He et al. 2016 (torchvision v1.5: the stride sits on the 3x3 convolution), on raw tensors."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0.0, 1e-5)

    x = F.conv2d(x, sd["conv1.weight"], stride=1 if cifar else 2, padding=1 if cifar else 3)
    x = F.relu(bn(x, "bn1."))
    if not cifar:
        x = F.max_pool2d(x, 3, 2, 1)
    for li, n in enumerate(layers):
        for b in range(n):
            p = f"layer{li + 1}.{b}."
            s = 2 if li > 0 and b == 0 else 1
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1."))
                out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], stride=s, padding=1), p + "bn2."))
                out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3.")
            else:
                out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=s, padding=1), p + "bn1."))
                out = bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2.")
            if p + f"{shortcut}.0.weight" in sd:
                x = bn(F.conv2d(x, sd[p + f"{shortcut}.0.weight"], stride=s), p + f"{shortcut}.1.")
            x = F.relu(out + x)
    return x.mean((2, 3))


def linear(sd, p, c_out, c_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd[p + "weight"] = torch.randn(c_out, c_in, generator=g) / c_in**0.5
    sd[p + "bias"] = 0.1 * torch.randn(c_out, generator=g)
    return sd


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


R18 = dict(bottleneck=False, layers=(2, 2, 2, 2))
R50 = dict(bottleneck=True, layers=(3, 4, 6, 3))


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_lemniscate_resnet18_forward_matches_reference():
    trunk = resnet_sd(**R18, counters=False)  # PyTorch 0.4.0 had no num_batches_tracked
    sd = linear(dict(trunk), "fc.", 128, 512)
    ck = {"epoch": 200, "arch": "resnet18", "state_dict": prefixed(sd, "module."), "best_prec1": 41.0,
          "optimizer": {"state": {}, "param_groups": []}}
    assert detect_layout(ck) == "lemniscate"
    conv = convert(ck)
    assert (conv.arch, conv.width, conv.cifar_stem, conv.head_dims) == ("resnet18", 64, False, (512, 0, 128))
    assert len(conv.filled) == sum(k.endswith("running_mean") for k in trunk) and not conv.ignored
    model = PublishedModel(conv).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = ref_resnet(trunk, x, **R18)
    with torch.no_grad():
        assert close(model.backbone(x), ref)
        assert close(model.embed(x), F.normalize(ref @ sd["fc.weight"].t() + sd["fc.bias"], dim=1))
    assert model.input_size == 224 and model.norm_stats[0] == LAYOUTS["lemniscate"].mean


def test_lemniscate_resnet50_every_key_maps_with_its_value():
    trunk = resnet_sd(**R50)
    sd = prefixed(linear(dict(trunk), "fc.", 128, 2048), "module.")
    conv = convert({"state_dict": sd, "arch": "resnet50", "lemniscate": Placeholder()})
    assert conv.arch == "resnet50" and conv.head_dims == (2048, 0, 128) and not conv.filled
    # Every source tensor reaches exactly one of ours, unchanged.
    ours = {**{("backbone", k): v for k, v in conv.backbone.items()}, **{("head", k): v for k, v in conv.head.items()}}
    assert len(ours) == len(sd)
    used = {id(v) for v in ours.values()}
    assert all(id(v) in used for v in sd.values())
    assert conv.backbone["stem.0.weight"] is sd["module.conv1.weight"]
    assert conv.backbone["layer3.0.shortcut.1.running_var"] is sd["module.layer3.0.downsample.1.running_var"]
    assert conv.backbone["layer4.2.bn3.weight"] is sd["module.layer4.2.bn3.weight"]


def _save_with_foreign_object(path, payload_factory, *, zipfile=True):
    """torch.save a checkpoint that pickles an object of a class from a module we then remove (as
    lemniscate's NCEAverage or PIC's argparse options are foreign to us)."""
    mod = types.ModuleType("lib.NCEAverage")
    pkg = types.ModuleType("lib")

    class NCEAverage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("memory", torch.randn(10, 4))

    NCEAverage.__module__ = "lib.NCEAverage"
    NCEAverage.__qualname__ = "NCEAverage"
    mod.NCEAverage = NCEAverage
    pkg.NCEAverage = mod
    sys.modules["lib"], sys.modules["lib.NCEAverage"] = pkg, mod
    try:
        torch.save(payload_factory(NCEAverage()), path, _use_new_zipfile_serialization=zipfile)
    finally:
        del sys.modules["lib"], sys.modules["lib.NCEAverage"]


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zipfile", [True, False])
def test_reads_checkpoints_with_pickled_training_objects(tmp_path, zipfile):
    trunk = resnet_sd(**R18, width=8)
    sd = prefixed(linear(dict(trunk), "fc.", 16, 64), "module.")
    path = tmp_path / "lemniscate_resnet18.pth"
    _save_with_foreign_object(path, lambda obj: {"epoch": 3, "arch": "resnet18", "state_dict": sd, "lemniscate": obj},
                              zipfile=zipfile)
    with pytest.raises(Exception):  # noqa: B017  (the weights-only reader refuses it: the case we handle)
        torch.load(path, weights_only=True)
    ck = read_weights(path)
    assert isinstance(ck["lemniscate"], Placeholder) and "NCEAverage" in repr(ck["lemniscate"])
    assert torch.equal(ck["state_dict"]["module.layer2.0.conv1.weight"], sd["module.layer2.0.conv1.weight"])
    model = load_published(path)
    assert model.arch == "resnet18" and model.backbone.feat_dim == 64


def test_placeholder_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("side effect!",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Evil()}, path)
    ck = read_weights(path)
    assert isinstance(ck["x"], Placeholder) and ck["x"].args == ("side effect!",)


def pic_state(mlp=True, extras=("sim_matrix",)):
    trunk = resnet_sd(**R50, counters=True)
    enc = dict(trunk)
    if mlp:
        linear(enc, "fc1.", 2048, 2048, seed=2)
        linear(enc, "fc2.", 128, 2048, seed=3)
    else:
        linear(enc, "fc.", 128, 2048)
    sd = prefixed(enc, "module.encoder.")
    for e in extras:
        if e == "sim_matrix":
            sd["module.sim_matrix"] = torch.randn(100, 128)
        elif e == "memory":
            sd["module.memory"] = torch.randn(100, 128)
        elif e == "moco":
            sd.update(prefixed(enc, "module.encoder_k."))
            sd["module.queue"] = torch.randn(128, 64)
            sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return trunk, enc, sd


def test_pic_current_pth_with_mlp_head(tmp_path):
    trunk, enc, sd = pic_state()
    opt = argparse.Namespace(arch="resnet50", mlp_head=True, feature_dim=128, contrast_temperature=0.2)
    path = tmp_path / "current.pth"
    torch.save({"opt": opt, "model": sd, "optimizer": {}, "scheduler": {}, "epoch": 400}, path)
    model = load_published(path)
    assert model.layout == "pic" and model.arch == "resnet50"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    f = ref_resnet(trunk, x, **R50)
    z = F.relu(f @ enc["fc1.weight"].t() + enc["fc1.bias"]) @ enc["fc2.weight"].t() + enc["fc2.bias"]
    with torch.no_grad():
        assert close(model.backbone(x), f)
        assert close(model.embed(x), F.normalize(z, dim=1))
    assert "module.sim_matrix" in convert(read_weights(path)).ignored


@pytest.mark.parametrize("extras", [("memory",), ("moco",)])
def test_pic_repo_reimplementations_ignore_their_training_state(extras):
    _, _, sd = pic_state(mlp=False, extras=extras)
    conv = convert({"model": sd, "epoch": 1})
    assert conv.head_dims == (2048, 0, 128)
    assert conv.ignored and all(k.startswith(("module.memory", "module.queue", "module.encoder_k.")) for k in conv.ignored)


def test_sela_torchvision_release():
    trunk = resnet_sd(**R18, width=16)
    sd = linear(dict(trunk), "fc.", 1000, 128)
    ck = {"state_dict": sd, "labels": torch.randint(0, 1000, (50,))}
    assert detect_layout(ck) == "sela"
    model = load_published(ck)
    assert model.head is None and len(model.cluster_heads) == 1
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    f = ref_resnet(trunk, x, **R18)
    with torch.no_grad():
        assert close(model.embed(x), F.normalize(f, dim=1))  # SeLa's head clusters; features are the trunk's
        assert close(model.cluster_logits(x)[0], f @ sd["fc.weight"].t() + sd["fc.bias"])


def test_sela_v1_state_dict_with_data_parallel_features_and_ten_heads():
    trunk = resnet_sd(**R50)
    ren = {"conv1.": "features.0.", "bn1.": "features.1.", "layer1.": "features.4.", "layer2.": "features.5.",
           "layer3.": "features.6.", "layer4.": "features.7."}
    sd = {}
    for k, v in trunk.items():
        for a, b in ren.items():
            if k.startswith(a):
                sd[b.replace("features.", "features.module.") + k[len(a):]] = v
    for h in range(10):
        linear(sd, f"top_layer{h}.", 300, 2048, seed=h)
    assert detect_layout(sd) == "sela-v1"
    conv = convert(sd)
    assert conv.arch == "resnet50" and len(conv.cluster_heads) == 10 and conv.head_dims is None
    assert conv.backbone["layer2.0.shortcut.0.weight"] is trunk["layer2.0.downsample.0.weight"]
    assert conv.cluster_heads[7][0] is sd["top_layer7.weight"]


def test_sela_preactivation_resnet_is_refused_with_the_reason():
    sd = {"features.0.weight": torch.zeros(64, 3, 7, 7), "features.2.0.bn1.weight": torch.ones(64),
          "features.2.0.conv1.weight": torch.zeros(64, 64, 1, 1), "top_layer0.weight": torch.zeros(3000, 2048)}
    assert detect_layout(sd) == "sela-v2"
    with pytest.raises(CheckpointError, match="pre-activation"):
        convert(sd)


def test_lemniscate_cifar_layout():
    trunk = resnet_sd(**R18, width=8, cifar=True, shortcut="shortcut")
    sd = prefixed(linear(dict(trunk), "linear.", 16, 64), "module.")
    ck = {"net": sd, "acc": 80.4, "epoch": 199}
    assert detect_layout(ck) == "lemniscate-cifar"
    model = load_published(ck)
    assert model.input_size == 32 and model.backbone.feat_dim == 64
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert close(model.backbone(x), ref_resnet(trunk, x, **R18, cifar=True, shortcut="shortcut"))


def test_unknown_layout_and_unmatched_keys_are_listed():
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*blocks.0.attn"):
        convert({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    trunk = resnet_sd(**R18, width=8)
    sd = prefixed(linear(dict(trunk), "fc.", 16, 64), "module.")
    sd["module.layer2.0.se.fc.weight"] = torch.zeros(4, 4)  # a squeeze-excitation ResNet: not ours
    sd["module.extra_bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match=r"2 key\(s\) match nothing.*layer2\.0\.se\.fc\.weight.*extra_bias"):
        convert({"state_dict": sd, "arch": "x"}, "lemniscate")


def test_missing_keys_and_wrong_shapes_are_listed():
    trunk = resnet_sd(**R18, width=8)
    sd = prefixed(linear(dict(trunk), "fc.", 16, 64), "module.")
    del sd["module.layer3.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: layer3\.1\.conv2\.weight"):
        convert({"state_dict": sd}, "lemniscate")
    sd = prefixed(linear(dict(trunk), "fc.", 16, 64), "module.")
    sd["module.layer1.0.bn1.running_var"] = torch.ones(9)
    with pytest.raises(CheckpointError, match=r"shape mismatches: layer1\.0\.bn1\.running_var \(9,\)"):
        convert({"state_dict": sd}, "lemniscate")
    sd = prefixed(dict(trunk), "module.")
    sd.update(prefixed(resnet_sd(bottleneck=False, layers=(2, 2, 3, 2), width=8), "module."))
    with pytest.raises(CheckpointError, match=r"blocks \(2, 2, 3, 2\) per stage is not one of"):
        convert({"state_dict": sd}, "lemniscate")


def sela_alexnet_sd(width=16, heads=3, seed=0):
    """SeLa's models.alexnet ('big', BN) state dict, channels scaled by width / 64."""
    g = torch.Generator().manual_seed(seed)
    ch = [c * width // 64 for c in (96, 256, 384, 384, 256)]
    fc = 4096 * width // 64
    spec = [(0, 1, ch[0], 3, 11), (4, 5, ch[1], ch[0], 5), (8, 9, ch[2], ch[1], 3), (11, 12, ch[3], ch[2], 3),
            (14, 15, ch[4], ch[3], 3)]
    sd = {}
    for c, b, co, ci, k in spec:
        _conv(sd, f"features.{c}.weight", co, ci, k, g)
        sd[f"features.{c}.bias"] = 0.1 * torch.randn(co, generator=g)
        _bn(sd, f"features.{b}.", co, g, True)
    linear(sd, "classifier.1.", fc, ch[4] * 36, seed=seed + 1)
    linear(sd, "classifier.4.", fc, fc, seed=seed + 2)
    for h in range(heads):
        linear(sd, f"top_layer{h}.", 50, fc, seed=seed + 3 + h)
    return sd


def ref_sela_alexnet(sd, x):
    """SeLa's AlexNet forward (convolutions with bias, BN, ReLU, pools after conv 1, 2, 5), eval mode."""
    pads = {0: (4, 2), 4: (1, 2), 8: (1, 1), 11: (1, 1), 14: (1, 1)}
    for c, b in [(0, 1), (4, 5), (8, 9), (11, 12), (14, 15)]:
        s, p = pads[c]
        x = F.conv2d(x, sd[f"features.{c}.weight"], sd[f"features.{c}.bias"], stride=s, padding=p)
        x = F.relu(F.batch_norm(x, sd[f"features.{b}.running_mean"], sd[f"features.{b}.running_var"],
                                sd[f"features.{b}.weight"], sd[f"features.{b}.bias"], False, 0.0, 1e-5))
        if c in (0, 4, 14):
            x = F.max_pool2d(x, 3, 2)
    x = x.flatten(1)  # (B, 256 * 6 * 6) at 224 px
    x = F.relu(x @ sd["classifier.1.weight"].t() + sd["classifier.1.bias"])
    return F.relu(x @ sd["classifier.4.weight"].t() + sd["classifier.4.bias"])


@pytest.mark.skipif("alexnet" not in ARCHS, reason="models.py has no AlexNet backbone yet (build_backbone('alexnet'))")
def test_sela_alexnet_forward_matches_reference_with_folded_biases():
    sd = sela_alexnet_sd()
    ck = {f"features.module.{k[len('features.'):]}" if k.startswith("features.") else k: v for k, v in sd.items()}
    assert detect_layout(ck) == "sela-alexnet"
    model = load_published(ck)
    assert model.arch == "alexnet" and len(model.cluster_heads) == 3 and model.input_size == 224
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    ref = ref_sela_alexnet(sd, x)
    with torch.no_grad():
        assert close(model.backbone(x), ref)
        assert close(model.cluster_logits(x)[2], ref @ sd["top_layer2.weight"].t() + sd["top_layer2.bias"])
    sd["features.2.weight"] = torch.zeros(3)  # a ReLU has no weights: not SeLa's layout
    with pytest.raises(CheckpointError, match=r"features\.2\.weight"):
        convert(sd)


def test_cli_weights_summary_and_errors(tmp_path, capsys):
    trunk = resnet_sd(**R18, width=8, cifar=True, shortcut="shortcut")
    path = tmp_path / "ckpt.t7"
    torch.save({"net": prefixed(linear(dict(trunk), "linear.", 16, 64), "module."), "epoch": 1}, path)
    assert main(["weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout lemniscate-cifar" in out and "resnet18" in out and "linear 64->16" in out
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.weight": torch.zeros(2)}, bad)
    assert main(["weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown checkpoint layout" in err and "Traceback" not in err
    assert main(["weights", str(tmp_path / "nope.pth")]) == 2


def test_evaluation_commands_accept_released_weights(tmp_path, capsys):
    trunk = resnet_sd(**R18, width=8, cifar=True, shortcut="shortcut")
    path = tmp_path / "ckpt.t7"
    torch.save({"net": prefixed(linear(dict(trunk), "linear.", 16, 64), "module."), "epoch": 1}, path)
    assert main(["knn", str(path), "--data", "synthetic:64", "-k", "5", "--device", "cpu"]) == 0
    top1 = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= top1 <= 100.0
    assert main(["knn", str(path), "-k", "5"]) == 2  # released weights do not say what data they saw
    assert "--data" in capsys.readouterr().err
