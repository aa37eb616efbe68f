"""One evaluation path: the training loop's kNN, `knn`/`linear`/`lowshot`/`stages`/`report`/`embed`
on a run, and the demo embed and score through `instdisc.evaluate.embed_pair`; a run trained with
--test-data is evaluated on it.

The run trains on a tree whose own test split 1-NN classifies perfectly, and is given a --test-data
tree on which exactly half is right (its class "b" images have class "a"'s colour): a command that
ignores --test-data prints 100.00, one that honours it 50.00.
"""

import json

import pytest
from test_classes import PER_CLASS, make_tree, train_run

from instdisc.cli import main


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def run_with_test_data(tmp_path, cache):
    own = make_tree(tmp_path / "own", {"train": "abc", "test": "abc"})
    other = make_tree(tmp_path / "other", {"test": "bc"}, colours={"b": (220, 30, 30)})
    run = tmp_path / "run"
    assert train_run(run, own, "--test-data", str(other)) == 0
    return run, other.resolve()


def test_commands_evaluate_on_the_runs_test_data(run_with_test_data, tmp_path, capsys):
    run, other = run_with_test_data
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in recs if r["type"] == "final")["knn_top1"]
    assert final == pytest.approx(50.0)
    capsys.readouterr()
    assert main(["knn", str(run), "-k", "1"]) == 0
    # the same function as the training loop's final kNN: the same number, to the last digit
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(final, abs=5e-3)

    assert main(["embed", str(run), "--split", "test", "--out", str(tmp_path / "te.npy")]) == 0
    meta = json.loads((tmp_path / "te.meta.json").read_text())
    assert meta["source"] == str(other) and meta["shape"][0] == 2 * PER_CLASS

    for argv in (["knn", "-k", "1"], ["linear", "--epochs", "1", "--lr", "0.1"],
                 ["lowshot", "--shots", "1", "--draws", "1"], ["stages", "--epochs", "1", "--lr", "0.1"],
                 ["report"]):
        for p in (run / "eval" / "features").glob("*"):
            p.unlink()
        assert main([argv[0], str(run), *argv[1:]]) == 0, argv
        tests = [json.loads(p.read_text()) for p in (run / "eval" / "features").glob("test-*.meta.json")]
        assert tests and all(m["source"] == str(other) and m["shape"][0] == 2 * PER_CLASS for m in tests), argv


def test_embed_pair_counts_classes_by_the_training_split(tmp_path, cache):
    from instdisc.evaluate import embed_pair, load_subject, open_eval_sets

    root = make_tree(tmp_path / "tree", {"train": "abc", "test": "c"})
    run = tmp_path / "run"
    assert train_run(run, root) == 0
    subject = load_subject(run, device="cpu")
    train, test = open_eval_sets(subject, None)
    ev = embed_pair(subject, train, test)
    assert ev.num_classes == 3 and ev.classes == ["a", "b", "c"] and set(ev.test_y.tolist()) == {2}
    assert not subject.module.training
