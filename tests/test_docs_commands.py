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
        "WANDB_MODE=online instdisc train --logger wandb\n"
        "make demo\n"
        "```\n\n"
        "    instdisc linear RUN      # an indented block\n\n"
        "* a list item\n"
    )
    cmds = dc.extract([md])
    assert [(c.line, c.launcher[0], c.argv, c.env) for c in cmds] == [
        (4, "instdisc", ["knn", "RUN", "-k", "20"], []),
        (5, "torchrun", ["train", "--config", "c.yaml", "--out", "runs/x"], []),
        (7, "instdisc", ["train", "--logger", "wandb"], ["WANDB_MODE=online"]),
        (11, "instdisc", ["linear", "RUN"], []),
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


def test_search_commands_get_the_images_the_run_writes(commands, tmp_path):
    """Every documented `instdisc search` runs on inputs that make_search_images writes: a query
    image, a query folder, an index folder of at least -k images (a new placeholder fails here)."""
    dc.make_search_images(tmp_path)
    searches = [c for c in commands if c.argv[0] == "search"]
    assert len(searches) >= 3
    for c in searches:
        argv, notes = dc.plan(c)
        assert argv is not None, c.text
        query, index = dc._flag(argv, "--query"), dc._flag(argv, "--index")
        assert (tmp_path / query).is_file() or len(list((tmp_path / query).iterdir())) > 0, c.text
        if index is not None:
            assert len(list((tmp_path / index).iterdir())) >= int(dc._flag(argv, "-k") or 20), c.text
        assert all(w not in argv for w in ("IMG", "DIR", "RUN", "RUN_DIR")) and "~" not in " ".join(argv), c.text
    argv, notes = dc.plan(dc.DocCommand("x.md", 1, "", ["instdisc"],
                                        ["search", "RUN_DIR", "--query", "IMG|DIR", "[--index", "DIR]", "--out", "DIR"]))
    assert argv == ["search", "runs/digits", "--query", "photo.jpg", "--index", "photos", "--out", "search/"]
    assert len(notes) == 4


def test_a_train_line_repeated_in_a_second_doc_trains_into_a_new_folder():
    line = ["train", "--config", "configs/npid_digits.yaml", "--out", "runs/logged", "--logger", "none"]
    made: set[str] = set()
    outs = [dc._flag(dc.plan(dc.DocCommand(f, 1, "", ["instdisc"], line), made)[0], "--out") for f in ("a.md", "b.md", "c.md")]
    assert outs == ["runs/logged", "runs/logged_2", "runs/logged_3"]
    resumed, _ = dc.plan(dc.DocCommand("d.md", 1, "", ["instdisc"], ["train", "--out", "runs/logged", "--resume"]), made)
    assert dc._flag(resumed, "--out") == "runs/logged"  # continuing a run is not a new one


def test_environment_words_are_kept_and_online_wandb_runs_offline():
    cmd = dc.DocCommand("x.md", 1, "", ["instdisc"], ["train", "--logger", "wandb"], ["WANDB_MODE=online", "OMP_NUM_THREADS=1"])
    env, notes = dc.command_env(cmd)
    assert env == {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    assert notes == ["WANDB_MODE=online -> offline (no network here)"]


def test_result_lines_of_search_and_logger_rows(tmp_path):
    out = "embedding\n3 queries, 5 nearest of 100 index images (photos; index features computed)\nwrote s/results.csv\n"
    assert dc.headline(out, "search") == "3 queries, 5 nearest of 100 index images (photos; index features computed)"
    assert dc.headline(out) == "wrote s/results.csv"
    (tmp_path / "runs/x/mlruns/0").mkdir(parents=True)
    (tmp_path / "runs/x/tb").mkdir()  # empty: nothing written there
    argv = ["train", "--out", "runs/x", "--logger", "tensorboard", "mlflow"]
    assert dc.logger_outputs(tmp_path, argv) == "; RUN holds mlruns/"
    assert dc.logger_outputs(tmp_path, ["train", "--out", "runs/x"]) == ""
