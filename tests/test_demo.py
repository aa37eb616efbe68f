import re

from instdisc.demo import run_demo


def test_demo_reports_learned_and_random_rows(tmp_path, capsys):
    res = run_demo(out=str(tmp_path / "demo"), epochs=1)
    text = capsys.readouterr().out
    rows = re.findall(r"^\s+(weighted kNN.*|1-NN.*)$", text, flags=re.M)
    assert len(rows) == 2, text
    # Each row prints random, learned and their difference, matching the returned numbers.
    for row, (r, lr) in zip(rows, [("random_top1", "learned_top1"), ("random_nn1", "learned_nn1")], strict=True):
        nums = [float(v) for v in re.findall(r"([-+]?\d+\.\d+)%", row)]
        assert nums == [round(res[r], 2), round(res[lr], 2)]
        assert f"{res[lr] - res[r]:+.2f} points" in row
    assert (tmp_path / "demo" / "checkpoints" / "last.pt").exists()
    assert all(0.0 <= v <= 100.0 for v in res.values())
    # The demo records its command as `train` does, so the run's report can print the line that reruns it.
    from instdisc.cli import build_parser
    from instdisc.report import command_html, read_command, rerun_command

    cmd = read_command(tmp_path / "demo")
    assert cmd is not None and cmd["argv"] == ["instdisc", "demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]
    line = rerun_command(cmd, str(tmp_path / "again"))
    args = build_parser().parse_args(line.split(" && ")[-1].split()[1:])
    assert (args.cmd, args.out, args.epochs) == ("demo", str(tmp_path / "again"), 1)
    assert "instdisc demo --out" in command_html(tmp_path / "demo")
