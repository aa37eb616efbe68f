"""The HTML report: self-contained, complete, and rendered without errors by headless Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from PIL import Image

from instdisc.cli import main
from instdisc.report import _STATUS_JS, build_report

CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium here (Debian: apt-get install chromium; .ci/run installs it)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reportrun") / "run"
    assert main(["train", "--method", "npid", "--data", "synthetic:120", "--out", str(out), "--width", "8",
                 "--batch-size", "40", "--nce-k", "16", "--knn-k", "10", "--epochs", "2", "--log-every", "1",
                 "--no-progress", "--device", "cpu", "--milestones", "100"]) == 0
    return out


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.refs, self.headings, self._h = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        self._h = tag in ("h2", "h3")

    def handle_data(self, data):
        if self._h:
            self.headings.append(data.strip())
            self._h = False


def parse(path):
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def test_report_is_self_contained_and_complete(run):
    path = build_report(run, queries=3, k=5, device="cpu")
    assert path == run / "report.html"
    text, page = parse(path)
    assert all(r.startswith("data:image/png;base64,") for r in page.refs)  # nothing outside the file
    assert len(page.imgs) == 2
    for img in page.imgs:
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        im.load()
        assert im.size[0] > 50 and im.size[1] > 50
    svgs = re.findall(r"<svg .*?</svg>", text, flags=re.S)
    titles = [ET.fromstring(s).get("aria-label") for s in svgs]
    assert {"training loss", "learning rate", "kNN monitor (%)"} <= set(titles)
    for h in ("Summary", "Training", "Evaluation", "Nearest neighbours", "Test embedding in 2-D", "Configuration"):
        assert h in page.headings, h
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert [r["k"] for r in knn["rows"]] == [10, 20, 100, 120]  # 200 clipped to the 120 training images
    assert "weighted kNN sweep" in text and f"{knn['rows'][0]['top1']:.2f}" in text
    assert "synthetic:120" in text and "no features" not in text


def test_report_includes_stored_results_and_every_logged_number(run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    with open(other / "metrics.jsonl", "a") as fh:  # what a clustering method logs per epoch
        fh.write(json.dumps({"type": "epoch", "epoch": 1, "step": 3, "loss": 5.0, "nmi": 41.5, "label_acc": 20.0}) + "\n")
        fh.write("{half a line\n")
    (other / "eval").mkdir(exist_ok=True)
    (other / "eval" / "lowshot.json").write_text(json.dumps(
        {"protocol": "lowshot", "classifier": "svm", "C": 1.0, "rows": [{"k": 1, "mean": 12.5, "std": 1.25, "runs": [1, 2]},
                                                                        {"k": 96, "skipped": "too few"}]}))
    (other / "figures").mkdir()
    Image.new("RGB", (30, 20), (9, 9, 9)).save(other / "figures" / "clusters.png")
    text, page = parse(build_report(other, data="synthetic:120", queries=2, k=3, device="cpu"))
    titles = [ET.fromstring(s).get("aria-label") for s in re.findall(r"<svg .*?</svg>", text, flags=re.S)]
    assert "nmi" in titles and "label_acc" in titles
    assert "12.50 ± 1.25" in text and "too few" in text
    assert len(page.imgs) == 3 and "clusters.png" in text


def test_report_says_what_it_could_not_make(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": {"method": "npid"}, "data": {"data": "synthetic:64"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 1, "loss": 3.0, "knn_top1": 12.0}) + "\n")
    text, page = parse(build_report(run))
    assert "no features" in text and "no checkpoint" in text and not page.imgs
    assert "kNN monitor (%)" in text


def test_report_command(run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--queries", "2", "-k", "4", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def chromium(url, tmp_path, *extra):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr",
           "--v=0", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr):
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


@needs_chromium
def test_report_renders_in_headless_chromium(run, tmp_path):
    path = build_report(run, queries=4, k=20, device="cpu")
    dom = chromium(path.resolve().as_uri(), tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    root = re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert 'data-status="ok"' in root and 'data-images="2"' in root, root
    assert not console_lines(dom.stderr), console_lines(dom.stderr)
    shot = run / "report.png"  # kept with the run, as the CI artefact of what the page looks like
    res = chromium(path.resolve().as_uri(), tmp_path, "--hide-scrollbars", "--window-size=1280,2400",
                   f"--screenshot={shot}")
    assert res.returncode == 0 and not console_lines(res.stderr)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2400)
    colours = im.resize((64, 120)).getcolors(64 * 120)
    assert colours is not None and len(colours) > 20  # not a blank page


@needs_chromium
def test_the_browser_check_catches_broken_images_and_script_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(f"<!doctype html><html><head><script>{_STATUS_JS}</script></head><body>"
                    "<img alt='broken' src='data:image/png;base64,iVBORw0KGgoAAAA'>"
                    "<script>console.error('seen'); undefinedFunction();</script></body></html>")
    dom = chromium(page.as_uri(), tmp_path, "--dump-dom")
    root = re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert 'data-status="error"' in root and 'data-bad-images="broken"' in root and "undefinedFunction" in root
    assert any("seen" in ln for ln in console_lines(dom.stderr))


def test_report_of_a_clustering_run_shows_cluster_grids(tmp_path):
    from instdisc.methods import METHODS

    if "sela" not in METHODS:
        pytest.skip("no SeLa method in this build")
    run = tmp_path / "sela"
    assert main(["train", "--method", "sela", "--data", "synthetic:120", "--out", str(run), "--width", "8",
                 "--batch-size", "40", "--hc", "2", "--ncl", "10", "--nopts", "2", "--epochs", "1", "--knn-k", "10",
                 "--no-progress", "--device", "cpu", "--milestones", "100"]) == 0
    text, page = parse(build_report(run, queries=2, k=3, device="cpu"))
    assert "Clusters" in page.headings
    assert sum("clusters of head" in img.get("alt", "") for img in page.imgs) == 2
    assert "<th>nmi</th>" in text
