"""Every `instdisc` command in README.md and docs/*.md parses with the real argument parser (no
unknown or removed flag, no invalid choice or value), and every one that cannot run on digits says
next to it what it needs. Running them all is benchmarks/docs_commands.py --run (docs/benchmarks.md)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import docs_commands as dc  # noqa: E402


@pytest.fixture(scope="module")
def commands():
    return dc.extract()


def test_every_documented_command_parses(commands):
    files = {c.file for c in commands}
    assert {"README.md", "docs/evaluation.md", "docs/export.md", "docs/slurm.md"} <= files
    assert {c.argv[0] for c in commands} >= {"train", "embed", "knn", "linear", "lowshot", "stages", "neighbours",
                                              "map", "report", "export", "clusters", "data", "weights"}
    bad = [f"{c.file}:{c.line}: {c.text}\n    {err}" for c in commands if (err := dc.check_parses(c.argv))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("argv", [
    ["train", "--method", "npid", "--nce-kk", "16"],  # a flag that does not exist
    ["train", "--config", "configs/npid_digits.yaml", "--epochs", "0"],  # refused by the config's checks
    ["train", "--method", "sela", "--nce-k", "16"],  # another method's flag
    ["export", "RUN", "--format", "tflite", "--out", "x.tfl"],  # not a choice
    ["map", "RUN", "--out", "map.png", "--method", "umap"],
    ["knn", "RUN", "--neighbours", "5"],
    ["nosuchcommand", "RUN"],
])
def test_the_check_refuses_what_the_cli_refuses(argv):
    assert dc.check_parses(argv) is not None


def test_the_check_accepts_the_doc_shorthand():
    assert dc.check_parses(["report", "RUN_DIR", "[--full]"]) is None
    assert dc.check_parses(["train", "--method", "pic", "--sampler", "sliding", "..."]) is None
    assert dc.normalise(["train", "--data", "...", "--out", "R", "..."]) == ["train", "--data", "PATH", "--out", "R"]
    assert dc.normalise(["search", "R", "--query", "IMG|DIR", "[--index", "DIR]"]) == [
        "search", "R", "--query", "IMG", "--index", "DIR"]


def test_extraction_reads_fenced_and_indented_blocks_and_nothing_else(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "Prose naming instdisc train --nothing here.\n\n"
        "```bash\n"
        "instdisc knn RUN -k 20   # a comment\n"
        "torchrun --nproc_per_node=2 -m instdisc train --config c.yaml \\\n"
        "    --out runs/x\n"
        "make demo\n"
        "```\n\n"
        "    instdisc linear RUN      # an indented block\n\n"
        "* a list item\n"
    )
    cmds = dc.extract([md])
    assert [(c.line, c.launcher[0], c.argv) for c in cmds] == [
        (4, "instdisc", ["knn", "RUN", "-k", "20"]),
        (5, "torchrun", ["train", "--config", "c.yaml", "--out", "runs/x"]),
        (10, "instdisc", ["linear", "RUN"]),
    ]


# Words that say, next to a command, what it needs beyond digits.
NEEDS_WORDS = ("GPU", "ImageNet", "imagenet", "CIFAR", "cifar", "released", "SLURM", "srun", "node")


def test_every_command_that_cannot_run_on_digits_says_what_it_needs(commands):
    missing = []
    for c in commands:
        argv, _ = dc.plan(c)
        if argv is not None:  # runs on digits (benchmarks/docs_commands.py --run)
            continue
        lines = (ROOT / c.file).read_text().splitlines()
        near = " ".join(lines[max(0, c.line - 4): c.line])  # the command, its comment, and the lines above
        if not any(w in near for w in NEEDS_WORDS):
            missing.append(f"{c.file}:{c.line}: {c.text}")
    assert not missing, "\n".join(missing)
