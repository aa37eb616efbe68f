"""The Python API (instdisc.load / instdisc.embed), the README's example, and file names in
exported features."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_published import R18, linear, prefixed, resnet_sd

import instdisc
from instdisc.cli import main
from instdisc.errors import UserError
from instdisc.features import load_features
from instdisc.sources import open_source

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    assert main(["train", "--method", "npid", "--data", "digits", "--out", str(root / "runs" / "digits"), "--width",
                 "8", "--batch-size", "64", "--nce-k", "16", "--knn-k", "10", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--milestones", "100"]) == 0
    return root


def test_readme_example_runs_on_a_digits_run(digits_run, monkeypatch, tmp_path):
    block = re.search(r"### Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md lost its Python API example"
    monkeypatch.chdir(digits_run)
    ns: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), ns)
    enc, z, out = ns["enc"], ns["z"], ns["out"]
    assert isinstance(enc, torch.nn.Module) and z.shape == (1, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(1), atol=1e-5)
    assert torch.allclose(enc(ns["img"]), z, atol=1e-6)  # enc(PIL image) preprocesses first
    assert ns["f"].shape == (1, 64) and out.features.shape == (360, 128) and out.labels.shape == (360,)
    assert out.paths is None  # digits come from scikit-learn's arrays, not files
    # The same features as `instdisc embed` writes.
    assert main(["embed", "runs/digits", "--split", "test", "--out", str(tmp_path / "t.npy"), "--device", "cpu"]) == 0
    feats, labels = load_features(tmp_path / "t.npy")
    assert torch.allclose(feats, out.features, atol=1e-5) and np.array_equal(labels.numpy(), out.labels)
    assert not (tmp_path / "t.paths.txt").exists()


def test_preprocess_accepts_pil_uint8_tensors_and_arrays(digits_run):
    enc = instdisc.load(digits_run / "runs" / "digits", device="cpu")
    g = np.random.default_rng(0)
    hwc = g.integers(0, 256, size=(2, 40, 36, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    pil = [Image.fromarray(a) for a in hwc]
    ref = enc.preprocess(chw)
    assert ref.shape == (2, 3, enc.size, enc.size) and ref.dtype == torch.float32
    for other in (enc.preprocess(hwc), enc.preprocess(pil), torch.cat([enc.preprocess(chw[0]), enc.preprocess(hwc[1])])):
        assert torch.equal(other, ref)
    assert torch.equal(enc(chw), enc(ref))
    with pytest.raises(UserError, match="uint8"):
        enc.preprocess(chw.float())
    with pytest.raises(UserError, match="expected PIL images"):
        enc.preprocess("photo.jpg")


def test_load_released_weights(tmp_path):
    path = tmp_path / "ckpt.t7"
    torch.save({"net": prefixed(linear(resnet_sd(**R18, width=8, cifar=True, shortcut="shortcut"), "linear.", 16, 64),
                                "module.")}, path)
    enc = instdisc.load(path, device="cpu")
    assert enc.size == 32 and enc.backbone is enc.model.backbone
    z = enc(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def _folder(root, n_per_class=3):
    g = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(g.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(d / f"{cls}_{i}.png")
    return root


def test_embed_writes_each_rows_file_name(tmp_path, digits_run):
    folder = _folder(tmp_path / "imgs")
    run = digits_run / "runs" / "digits"
    out = tmp_path / "f.npy"
    assert main(["embed", str(run), "--data", str(folder), "--split", "test", "--out", str(out), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    names = (tmp_path / "f.paths.txt").read_text().splitlines()
    assert sorted(names) == sorted(f"test/{c}/{c}_{i}.png" for c in ("cat", "dog") for i in range(3))
    feats, labels = load_features(out)
    enc = instdisc.load(run, device="cpu")
    for i, name in enumerate(names):  # row i is the image the file names
        assert torch.allclose(feats[i], enc(Image.open(folder / name))[0], atol=1e-5)
        assert labels[i] == ("cat", "dog").index(name.split("/")[1])
    # Streamed folders (large images) name their files too (image_size 32: no resize, same pixels).
    streamed = instdisc.embed(enc, open_source(str(folder), "test", in_memory=False, image_size=32, cache_dir=tmp_path / "c2"))
    assert [Path(p).relative_to(folder).as_posix() for p in streamed.paths] == names
    assert torch.allclose(streamed.features, feats, atol=1e-5)


def test_a_pil_image_of_any_mode_embeds_as_the_same_file_read_by_the_data_sources(digits_run, tmp_path):
    """enc(pil) converted with Pillow's convert("RGB"), which clips 16-bit grey at 255 (near white),
    while every source (embed, search, training) scales it to 0..255: two features for one file."""
    from instdisc.sources.images import to_rgb

    enc = instdisc.load(digits_run / "runs" / "digits", device="cpu")
    g = np.random.default_rng(0)
    grey16 = Image.fromarray(g.integers(0, 65536, size=(20, 20)).astype(np.uint16))
    ref = enc.preprocess(np.array(to_rgb(grey16)))
    assert not torch.equal(enc.preprocess(np.array(grey16.convert("RGB"))), ref)  # clipping differs
    assert torch.equal(enc.preprocess(grey16), ref)


@pytest.mark.parametrize("x,needle", [
    (torch.zeros(3, 16, 16), r"\(B, 3, H, W\)"),  # unbatched float: a conv error before
    (torch.zeros(2, 1, 16, 16), r"\(B, 3, H, W\)"),  # one channel: a conv error before
    (torch.zeros(3, 0, 5, dtype=torch.uint8), "no pixels"),  # a ZeroDivisionError before
    (np.zeros((0, 4, 3), np.uint8), "no pixels"),
])
def test_images_of_the_wrong_shape_are_user_errors(digits_run, x, needle):
    enc = instdisc.load(digits_run / "runs" / "digits", device="cpu")
    with pytest.raises(UserError, match=needle):
        enc(x)


@pytest.mark.parametrize("kw,needle", [({"split": "val"}, "split must be"), ({"batch_size": 0}, "batch_size"),
                                       ({"workers": -1}, "workers")])
def test_embed_refuses_a_split_or_size_it_cannot_honour(digits_run, kw, needle):
    """split="val" embedded the test split; batch_size=0 failed inside range()."""
    enc = instdisc.load(digits_run / "runs" / "digits", device="cpu")
    with pytest.raises(UserError, match=needle):
        instdisc.embed(enc, "digits", **kw)
