"""The HTML report: self-contained, complete, and rendered without errors by headless Chromium."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from instdisc.cli import main
from instdisc.report import _STATUS_JS, build_report, read_command, record_command, training_charts
from instdisc.visual import format_number, map_method_for, neighbour_grid

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
    assert "training loss" in titles
    for name in ("learning rate", "kNN monitor (%)"):  # a chart, or a table row where the series is flat
        assert name in titles or f"<td>{name}" in text, name
    for h in ("Summary", "Training", "Evaluation", "Nearest neighbours", "Test embedding in 2-D", "Configuration"):
        assert h in page.headings, h
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert [r["k"] for r in knn["rows"]] == [10, 20, 100, 120]  # 200 clipped to the 120 training images
    assert "weighted kNN sweep" in text and format_number(knn["rows"][0]["top1"]) in text
    assert "synthetic:120" in text and "no features" not in text


def test_report_includes_stored_results_and_every_logged_number(run, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    with open(other / "metrics.jsonl", "a") as fh:  # what a clustering method logs per epoch
        fh.write(json.dumps({"type": "epoch", "epoch": 1, "step": 3, "loss": 5.0, "nmi": 41.5, "label_acc": 20.0}) + "\n")
        fh.write(json.dumps({"type": "epoch", "epoch": 2, "step": 6, "loss": 4.0, "nmi": 45.5, "label_acc": 25.0}) + "\n")
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
    # 4 heads, the one with K = 10 (synthetic's number of classes) last: the report lists it first
    assert main(["train", "--method", "sela", "--data", "synthetic:120", "--out", str(run), "--width", "8",
                 "--batch-size", "40", "--hc", "4", "--ncl", "6", "6", "6", "10", "--nopts", "2", "--epochs", "1",
                 "--knn-k", "10", "--no-progress", "--device", "cpu", "--milestones", "100"]) == 0
    text, page = parse(build_report(run, queries=2, k=3, device="cpu"))
    assert "Clusters" in page.headings
    alts = [img.get("alt", "") for img in page.imgs if "clusters of head" in img.get("alt", "")]
    assert alts == ["clusters of head 3", "clusters of head 0", "clusters of head 1", "clusters of head 2"]
    section = text[text.index("<h2>Clusters"):]
    table = section[:section.index("</table>")]
    rows = [re.findall(r"<td>([^<]*)</td>", r) for r in table.split("<tr>")[2:]]
    assert [(r[0], r[1]) for r in rows] == [("3", "10"), ("0", "6"), ("1", "6"), ("2", "6")]
    assert rows[0][-1] != "" and all(r[-1] == "" for r in rows[1:])  # Hungarian accuracy only where K = classes
    assert "NMI %" in table and "first 3 of" not in text


def test_numbers_are_formatted_by_magnitude():
    assert [format_number(v) for v in (0.001, 97.2222, 12345, 12345.4, 0.07, 3e-05, 0.0, 5e-4, 1.0, 2.5)] == [
        "0.001", "97.22", "12,345", "12,345", "0.07", "3e-5", "0", "0.0005", "1.00", "2.50"]
    assert format_number("npid") == "npid"  # no JSON quotes
    assert format_number([0.4, 1.0]) == "0.4, 1.00" and format_number(None) == "none" and format_number(True) == "yes"


def epoch(e, **kw):
    return {"type": "epoch", "epoch": e, "step": 10 * e, **kw}


def test_per_head_numbers_share_one_chart_and_flat_series_are_a_table():
    records = [epoch(1, bank_init=1.0), *(epoch(e, relabel_heads=4, nmi=float(e), **{f"nmi_h{h}": e + 0.1 * h for h in range(4)},
                                                sk_rebuilds_h0=0.0, sk_rebuilds_h1=0.0) for e in (2, 3, 4))]
    charts, values = training_charts(records)
    titles = [ET.fromstring(c).get("aria-label") for c in charts]
    assert titles == ["nmi"]  # one chart for the four heads, nothing else is worth a chart
    nmi = ET.fromstring(charts[0])
    ns = "{http://www.w3.org/2000/svg}"
    assert len(nmi.findall(f"{ns}polyline")) == 4  # one line per head; the logged mean over heads is left out
    assert [t.text for t in nmi.findall(f"{ns}text") if t.text and t.text.startswith("head")] == [
        "head 0", "head 1", "head 2", "head 3"]
    got = {v["number"]: (v["value"], v["logged"]) for v in values}
    assert set(got) == {"bank_init", "relabel_heads", "sk_rebuilds, head 0", "sk_rebuilds, head 1"}
    assert got["bank_init"] == (1.0, "epoch 1") and got["relabel_heads"][0] == 4
    assert "constant" in got["relabel_heads"][1]


def test_neighbour_grid_writes_similarities_and_a_legible_class_name():
    grey = np.full((16, 16, 3), 128, np.uint8)
    cell, gap = 64, 4

    def ink(img, x0, y0, x1, y1):  # rows of the box holding dark text pixels
        a = np.asarray(img.convert("L"))[y0:y1, x0:x1] < 110
        r = np.where(a.any(1))[0]
        return 0 if r.size == 0 else int(r.max() - r.min() + 1)

    kw = dict(captions=["Hg"], cell=cell, gap=gap)
    with_sims = neighbour_grid([grey], [[grey, grey]], [[True, False]], sims=[[0.93, 0.5]], **kw)
    without = neighbour_grid([grey], [[grey, grey]], [[True, False]], **kw)
    band = (gap + cell, gap + cell + 20)  # below the cells
    first = gap + (cell + gap) + gap  # x of the first neighbour
    assert ink(with_sims, first, *band[:1], first + cell, band[1]) > 0 and ink(without, first, band[0], first + cell, band[1]) == 0
    assert ink(with_sims, gap, band[0], gap + cell, band[1]) >= 11  # "Hg" from ascender to descender: an >= 11 px font


def test_the_2d_map_is_tsne_for_small_sets_and_pca_for_large():
    assert map_method_for(360) == "tsne" and map_method_for(5000) == "tsne" and map_method_for(5001) == "pca"
    assert map_method_for(360, "pca") == "pca" and map_method_for(10**6, "tsne") == "tsne"


def test_report_heads_with_the_run_name_prints_plain_values_and_the_command_that_reruns_it(run, tmp_path, monkeypatch):
    import shlex

    cmd = read_command(run)
    assert cmd is not None and cmd["argv"][:4] == ["instdisc", "train", "--method", "npid"]
    record_command(run, ["--out", str(run), "--resume"], resumed=True)  # a later launch keeps the first command
    assert read_command(run) == cmd
    text, page = parse(build_report(run, queries=2, k=3, device="cpu"))
    head = text[text.index("<h1>"):text.index("<h2>")]
    assert f"<h1>{run.name}: npid on synthetic:120</h1>" in head and str(run.resolve()) not in head
    summary = text[text.index("<h2>Summary"):text.index("<h2>Command")]
    assert "&quot;" not in summary and "<td class=\"l\">npid</td>" in summary
    assert "t-SNE of all" in text  # 120 points: t-SNE, and the caption says so
    pres = [html.unescape(p) for p in re.findall(r"<pre class='cmd'>(.*?)</pre>", text, flags=re.S)]
    assert pres[0] == shlex.join(cmd["argv"])
    cd, line = pres[1].split(" && ", 1)
    assert shlex.split(cd) == ["cd", cmd["cwd"]]
    argv = shlex.split(line)
    assert argv[:2] == ["instdisc", "train"] and argv[argv.index("--out") + 1] == f"{run}-rerun"
    # the printed command trains the same run again (only --out differs)
    new = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(new)
    assert main(argv[1:]) == 0
    a, b = json.loads((run / "config.json").read_text()), json.loads((new / "config.json").read_text())
    a["run"].pop("out"), b["run"].pop("out")
    assert a == b


def test_the_rerun_line_of_a_multi_process_run_uses_torchrun():
    from instdisc.report import rerun_command

    cmd = {"argv": ["instdisc", "train", "--config", "c.yaml", "--out=runs/x"], "cwd": "/w d", "world_size": 2, "nodes": 1}
    assert rerun_command(cmd, "runs/x-rerun") == (
        "cd '/w d' && torchrun --standalone --nproc_per_node=2 -m instdisc train --config c.yaml --out=runs/x-rerun")
    two_nodes = {**cmd, "world_size": 16, "nodes": 2}
    assert "torchrun --nnodes=2 --nproc_per_node=8 -m instdisc" in rerun_command(two_nodes)


def test_chart_ticks_of_a_narrow_range_stay_distinct():
    from instdisc.visual import svg_line_chart

    svg = ET.fromstring(svg_line_chart({"loss": ([1, 2, 3], [3.165, 3.17, 3.172])}, title="loss"))
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.get("text-anchor") == "end"]
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_label_free_signals_are_charted_after_knn_with_their_meaning():
    import re

    from instdisc.report import training_charts

    recs = [{"type": "epoch", "epoch": e, "step": 10 * e, "loss": 5.0 - e, "knn_top1": 30.0 + e,
             "align": 0.2 + 0.01 * e, "uniform": -1.0 - e, "rankme": 20.0 + e, "nn_agree": 0.5 + 0.1 * e,
             "other": float(e)} for e in range(1, 5)]
    charts, _ = training_charts(recs)
    titles = [re.findall(r"<text[^>]*>([^<]*)</text>", c)[0] for c in charts]
    i = titles.index("kNN monitor (%)")
    assert [t.split(",")[0].split(" ")[0] for t in titles[i + 1:i + 5]] == ["alignment", "uniformity", "effective",
                                                                            "neighbour"]
    assert "no labels" in titles[i + 1] and titles[-1] == "other"


def test_a_large_tsne_says_it_started(monkeypatch, capsys):
    """t-SNE's optimiser reports nothing for tens of seconds: the map says on stderr that it runs."""
    import numpy as np
    import torch

    import instdisc.visual as visual
    from instdisc.report import map_figure

    monkeypatch.setattr(visual, "embed_2d", lambda x, method, seed: np.zeros((x.shape[0], 2)))  # the cost is not the point
    x, y = torch.randn(1200, 8), torch.arange(1200) % 3
    map_figure(x, y, ["a", "b", "c"], method="tsne", max_points=1200, seed=0, progress=True)
    assert "t-SNE of 1,200 points" in capsys.readouterr().err
    map_figure(x, y, ["a", "b", "c"], method="pca", max_points=1200, seed=0, progress=True)
    map_figure(x, y, ["a", "b", "c"], method="tsne", max_points=1200, seed=0)
    assert capsys.readouterr().err == ""
