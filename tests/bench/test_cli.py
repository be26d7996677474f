"""rampde-bench on the CPU: env, a tiny run and its claims, the suites and their overrides, the
report command's defaults, and every bad value refused with exit code 2 and the option's name."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rampde.bench import cli
from rampde.bench.cli import main
from rampde.bench.results import read_results
from rampde.bench.suites import CPU_QUICK_COMPETITORS, get_suite

TINY_RUN = ["run", "--competitors", "torchdiffeq-fp32,rampde-bf16", "--workloads", "mlp", "--widths", "8",
            "--batch", "8", "--steps", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu"]


def test_env_prints_the_environment(capsys):
    assert main(["env", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "commit" in out and "cudnn_tf32" in out
    assert main(["env", "--device", "cpu", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__
    assert main(["env", "--device", "cpu", "--slug"]) == 0
    assert capsys.readouterr().out == "cpu\n"


def test_module_entry_point_runs_env():
    done = subprocess.run([sys.executable, "-m", "rampde.bench", "env", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["device"] == "cpu"


def test_tiny_run_then_claims(tmp_path, capsys):
    out = tmp_path / "res"
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 ok" in captured.err and "claims per cell" in captured.out
    table = read_results(out / "results.csv")
    assert table["competitor"].tolist() == ["torchdiffeq-fp32", "rampde-bf16"]
    assert set(table["status"]) == {"ok"}

    assert main([*TINY_RUN, "--out", str(out)]) == 0, "a rerun resumes: nothing left to measure"
    assert "nothing new" in capsys.readouterr().err
    assert len(read_results(out / "results.csv")) == 2

    csv = tmp_path / "claims.csv"
    assert main(["claims", str(out / "results.csv"), "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "speedup_vs_fp32" in printed and "rampde-bf16" in printed and "claims per GPU" in printed
    per_cell = pd.read_csv(csv)  # the per-cell claims as a plain CSV
    assert per_cell["competitor"].tolist() == ["rampde-bf16"] and per_cell["speedup_vs_fp32"][0] > 0


def test_a_cell_error_is_shown_and_exits_1(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from rampde.bench import competitors

    def broken(workload, steps):
        raise ValueError("bad [shape] (8, 8)")

    broken_one = replace(competitors.get_competitor("rampde-bf16"), run=broken)
    monkeypatch.setitem(competitors._REGISTRY, "rampde-bf16", broken_one)
    assert main([*TINY_RUN, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ValueError: bad [shape] (8, 8)" in err and "1 error, 1 ok" in err and "--retry-errors" in err


def test_interrupted_run_exits_130(tmp_path, monkeypatch, capsys):
    from rampde.bench import sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main([*TINY_RUN, "--out", str(tmp_path)]) == 130
    assert "run the same command to resume" in capsys.readouterr().err


def test_a_lost_device_stops_the_run_with_exit_1(tmp_path, monkeypatch, capsys):
    from rampde.bench import sweep

    def lost(*args, **kwargs):
        raise sweep.DeviceLost("cuda:0 is unusable after rampde-bf16 mlp w8 b8 N2 failed (CUDA error: an illegal "
                               "memory access was encountered)")

    monkeypatch.setattr(sweep, "run_sweep", lost)
    assert main([*TINY_RUN, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stopped:" in err and "illegal memory access" in err and "results.csv" in err


def test_run_interrupted_after_its_cells_exits_130_with_the_results_whole(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_print_claims", interrupted)  # Ctrl-C while the claims print
    assert main([*TINY_RUN, "--out", str(tmp_path)]) == 130
    assert cli.INTERRUPTED in capsys.readouterr().err
    table = read_results(tmp_path / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"ok"}


def _plan(*argv: str):
    args = cli.build_parser().parse_args(["run", *argv])
    return cli._plan(args, torch.device("cpu"))


def test_quick_cpu_suite_and_overrides():
    suite, cells, repeats, warmup = _plan()
    assert suite.name == "quick" and (repeats, warmup) == (5, 1)
    assert sorted({c.competitor for c in cells}) == sorted(CPU_QUICK_COMPETITORS)
    assert {(c.workload, c.width, c.batch, c.steps) for c in cells} == {
        ("mlp", w, 16, n) for w in (16, 32) for n in (4, 8)}
    assert len(cells) == 6 * 2 * 2
    _, cells, repeats, warmup = _plan("--workloads", "conv", "cnf", "--steps", "3", "--repeats", "7",
                                      "--warmup", "0", "--competitors", "all")
    assert (repeats, warmup) == (7, 0) and len({c.competitor for c in cells}) >= 15
    assert {(c.workload, c.width, c.batch, c.steps) for c in cells} == {("conv", 8, 8, 3), ("cnf", 16, 64, 3)}
    _, cells, _, _ = _plan("--widths", "24,40", "--batch", "32", "--competitors", "rampde-fp32")
    assert {(c.width, c.batch) for c in cells} == {(24, 32), (40, 32)}


def test_gpu_and_paper_suites():
    quick = get_suite("quick", "cuda")
    assert quick.workloads == {"mlp": {"widths": [256, 1024, 2048], "batches": [2048]},
                               "conv": {"widths": [64], "batches": [64]}}
    assert quick.steps == [16, 64] and len(quick.competitors) >= 15
    paper = get_suite("paper", "cuda")
    assert paper.workloads["mlp"] == {"widths": [256, 512, 1024, 2048, 4096], "batches": [2048]}
    assert paper.workloads["conv"] == {"widths": [32, 64, 128, 256], "batches": [64]}
    assert "cnf" in paper.workloads and paper.steps == [8, 16, 32, 64, 128, 256]
    for suite in (quick, paper):
        for sizes in suite.workloads.values():
            assert all(v % 8 == 0 for v in sizes["widths"] + sizes["batches"])


def test_default_output_folders():
    cpu = torch.device("cpu")
    assert cli._default_out("quick", cpu) == Path("reports/quick/cpu")
    assert cli._default_out("paper", cpu) == Path("reports/cpu")
    assert cli._default_out("perf", cpu) == Path("reports/quick/cpu-perf"), "git ignores CPU runs of the perf suite"


def test_perf_cpu_suite_plan_and_every_suite_named_in_the_help():
    from rampde.bench.suites import PERF_COMPETITORS, SUITE_NAMES

    suite, cells, repeats, warmup = _plan("--suite", "perf")
    assert suite.name == "perf" and (repeats, warmup) == (3, 1)
    assert sorted({c.competitor for c in cells}) == sorted(PERF_COMPETITORS)
    assert {(c.workload, c.width, c.batch, c.steps) for c in cells} == {
        *{("mlp", w, 16, n) for w in (16, 32, 64) for n in (2, 8)}, *{("conv", 8, 8, n) for n in (2, 8)}}
    assert len(cells) == len(PERF_COMPETITORS) * 4 * 2
    run = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if a.dest == "suite")
    assert all(name in run.help for name in SUITE_NAMES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--suite", "huge"], "--suite: unknown suite 'huge'; known: quick, paper, perf"),
        (["run", "--competitors", "torchdiffeq-fp32,nope"], "--competitors: unknown competitor 'nope'"),
        (["run", "--workloads", "rnn"], "--workloads: unknown ['rnn']; known: mlp, conv, cnf"),
        (["run", "--widths", "12"], "--widths: 12 is not a positive integer multiple of 8"),
        (["run", "--widths", "0"], "--widths: 0 is not a positive integer multiple of 8"),
        (["run", "--widths", "wide"], "--widths: 'wide' is not an integer"),
        (["run", "--batch", "-8"], "--batch: -8 is not a positive integer multiple of 8"),
        (["run", "--steps", "0"], "--steps: 0 is not a positive integer"),
        (["run", "--repeats", "0"], "--repeats: 0 is not a positive integer"),
        (["run", "--warmup", "-1"], "--warmup: -1 is not an integer >= 0"),
        (["run", "--seed", "-3"], "--seed: -3 is not an integer >= 0"),
        (["run", "--threads", "0"], "--threads: 0 is not a positive integer"),
        (["run", "--device", "tpu"], "--device: 'tpu' is not a torch device"),
        (["run", "--device", "cuda"], "--device: CUDA was asked for but torch sees no GPU"),
        (["env", "--device", "cuda"], "--device: CUDA was asked for but torch sees no GPU"),
        (["claims", "missing.csv"], "claims: no results file at missing.csv"),
        (["targets", "--results", "missing.csv"], "targets: no results file at missing.csv"),
    ],
)
def test_bad_values_exit_2_naming_the_option(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rampde-bench: error: ")


def test_argparse_errors_exit_2(capsys):
    assert main(["fly"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_report_defaults_and_options(tmp_path, monkeypatch, capsys):
    from rampde.bench import report

    calls = []

    def fake_build(results, out, asv_results=None, **kwargs):
        calls.append((results, out, asv_results, kwargs))
        return out

    monkeypatch.setattr(report, "build_dashboard", fake_build)
    monkeypatch.chdir(tmp_path)
    for folder in ("nvidia-h100-80gb-hbm3", "nvidia-a100-sxm4-80gb", "quick/cpu"):
        (tmp_path / "reports" / folder).mkdir(parents=True)
        (tmp_path / "reports" / folder / "results.csv").write_text("")
    (tmp_path / "reports" / "nvidia-h100-80gb-hbm3" / "training.csv").write_text("")
    assert main(["report"]) == 0
    results, out, asv, kwargs = calls[-1]
    assert results == [Path("reports/nvidia-a100-sxm4-80gb/results.csv"),
                       Path("reports/nvidia-h100-80gb-hbm3/results.csv"),
                       Path("reports/quick/cpu/results.csv")], "every reports/**/results.csv"
    assert out == Path("reports/index.html") and asv is None
    assert kwargs == {"training": [Path("reports/nvidia-h100-80gb-hbm3/training.csv")]}
    assert "dashboard:" in capsys.readouterr().out
    assert main(["report", "--results", "a.csv", "b.csv", "--asv-results", "asv", "--out", "x.html"]) == 0
    assert calls[-1][:3] == ([Path("a.csv"), Path("b.csv")], Path("x.html"), Path("asv"))
    (tmp_path / "reports" / "asv" / "results").mkdir(parents=True)  # asv.conf.json's results_dir
    assert main(["report"]) == 0
    assert calls[-1][2] == Path("reports/asv/results")


def test_report_missing_results_file(tmp_path, capsys):
    pytest.importorskip("plotly")
    assert main(["report", "--results", str(tmp_path / "none.csv"), "--out", str(tmp_path / "i.html")]) == 2
    assert "report: " in capsys.readouterr().err


def test_train_is_delegated(monkeypatch):
    training_cli = pytest.importorskip("rampde.bench.training_cli")
    seen = []
    monkeypatch.setattr(training_cli, "main_train", lambda args: seen.append(args) or 0)
    assert main(["train", "--task", "cnf", "--size", "tiny", "--epochs", "1"]) == 0
    assert seen[0].task == "cnf" and seen[0].size == "tiny" and seen[0].epochs == 1
    assert main(["train", "--size", "huge"]) == 2, "train's own option errors"


@pytest.mark.parametrize("size", ["1400", "10x2000", "axb", "1400x1600x2"])
def test_report_screenshot_size_is_checked_first(size, capsys):
    assert main(["report", "--screenshot", "x.png", "--screenshot-size", size]) == 2
    assert "--screenshot-size: expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_report_screenshot_without_chromium_names_the_option(monkeypatch, tmp_path, capsys):
    from rampde.bench import browser, report

    def fake_build(results, out, asv_results=None, **kwargs):
        out.write_text("<html></html>")
        return out

    monkeypatch.setattr(report, "build_dashboard", fake_build)
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    out, png = tmp_path / "i.html", tmp_path / "shot.png"
    assert main(["report", "--results", str(out), "--out", str(out), "--screenshot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "report --screenshot: no Chromium found" in err and "chromium package" in err
    assert not png.exists()


BINARY = bytes(range(128, 256)) * 4  # not UTF-8: pandas' parser raises UnicodeDecodeError


def test_a_file_as_out_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    from rampde.bench import profiling, sweep

    taken = tmp_path / "run.log"
    taken.write_text("a log\n")
    measured = []
    monkeypatch.setattr(sweep, "measure_cell", lambda *a, **k: measured.append(a))
    assert main([*TINY_RUN, "--out", str(taken)]) == 2
    assert f"--out: {taken} is a file; give a folder" in capsys.readouterr().err
    for command in (["ablate", "--workload", "mlp"], ["profile"], ["gemm"]):
        assert profiling.main([*command, "--device", "cpu", "--out", str(taken)]) == 2
        assert f"--out: {taken} is a file" in capsys.readouterr().err, command
    assert measured == [] and taken.read_text() == "a log\n"


def test_claims_of_a_file_that_is_no_csv_names_it(tmp_path, capsys):
    binary = tmp_path / "results.csv"
    binary.write_bytes(BINARY)
    assert main(["claims", str(binary)]) == 2
    err = capsys.readouterr().err
    assert f"{binary} is not a rampde results table: not a CSV file" in err and "Traceback" not in err


def test_report_leaves_out_a_file_that_is_no_csv_or_no_results_table(tmp_path, capsys):
    pytest.importorskip("plotly")
    binary, claims_csv = tmp_path / "binary.csv", tmp_path / "claims.csv"
    binary.write_bytes(BINARY)
    claims_csv.write_text("gpu,competitor,workload,method,width,batch,steps,time_ms\ncpu,rampde-bf16,mlp,rk4,8,8,2,1.0\n")
    out = tmp_path / "d.html"
    assert main(["report", "--results", str(binary), str(claims_csv), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert f"{binary} is not a CSV file" in text
    assert f"{claims_csv} lacks the column(s) status; it was left out." in text


def test_claims_targets_and_report_take_results_files_either_way(tmp_path, capsys):
    assert main([*TINY_RUN, "--out", str(tmp_path)]) == 0
    results = str(tmp_path / "results.csv")
    capsys.readouterr()
    for command in ("claims", "targets"):
        printed = []
        for argv in ([command, results], [command, "--results", results]):
            assert main(argv) == 0, argv
            printed.append(capsys.readouterr().out)
        assert printed[0] == printed[1] and "rampde-bf16" in printed[0], command
    if importlib.util.find_spec("plotly"):
        assert main(["report", results, "--out", str(tmp_path / "d.html")]) == 0
        assert "rampde-bf16" in (tmp_path / "d.html").read_text(encoding="utf-8")
