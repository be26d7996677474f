"""tools/gpu_campaign.py: the one-call GPU campaign's plan, limits, stopping, packing and merging,
and tools/asv_history.py's benchmark path. The steps' own commands are tested where they live."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch
import pytest
from _pytest.mark.expression import Expression

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


campaign = _load("gpu_campaign")
asv_history = _load("asv_history")

PY = sys.executable


def test_default_plan_fits_one_call_and_keeps_the_order():
    steps = campaign.select_steps(None)
    assert [s.name for s in steps] == list(campaign.STEP_NAMES)
    assert steps[0].name == "perf"  # the performance targets' cells before anything else
    budget = campaign.DEFAULT_BUDGET_S
    assert budget + 50 <= 600  # setup and the last pack fit in a 10-minute call
    left, limits = budget, []
    for step in steps:
        limits.append(campaign.step_limit(step.share, left))
        left -= limits[-1]
    assert sum(limits) <= budget - campaign.PACK_RESERVE_S
    assert all(limit >= campaign.MIN_STEP_S for limit in limits), limits


def test_select_steps_keeps_campaign_order_and_names_unknown_ones():
    assert [s.name for s in campaign.select_steps(["quick", "perf"])] == ["perf", "quick"]
    with pytest.raises(ValueError, match="unknown step.*nope.*known: perf"):
        campaign.select_steps(["perf", "nope"])


@pytest.mark.parametrize("share, left, expected", [(100, 500, 100), (100, 60, 50), (None, 300, 290), (50, 5, 0)])
def test_step_limit_is_the_share_within_what_is_left(share, left, expected):
    assert campaign.step_limit(share, left) == expected


def _matches(expression: str, test_id: str) -> bool:
    name = f"test_forward_backward[{test_id}]".lower()
    return Expression.compile(expression).evaluate(lambda word: word.lower() in name)


def test_pytest_selection_picks_every_competitor_small_and_the_main_ones_large():
    expr = campaign.pytest_selection("cuda")
    assert _matches(expr, "checkpoint-step-mlp-w256-b2048-N64")
    assert _matches(expr, "rampde-bf16-mlp-w2048-b2048-N64")
    assert _matches(expr, "torchdiffeq-tf32-mlp-w2048-b2048-N64")
    assert not _matches(expr, "rampde-bf16-fast-mlp-w2048-b2048-N64")
    assert not _matches(expr, "rampde-fp16-graph-mlp-w2048-b2048-N64")  # -k matches substrings
    assert _matches(expr, "rampde-fp16-graph-mlp-w256-b2048-N64")
    assert not _matches(expr, "checkpoint-step-mlp-w2048-b2048-N64")
    assert not _matches(expr, "rampde-bf16-conv-w128-b64-N64")
    assert _matches(campaign.pytest_selection("cpu"), "reversible-mlp-w8-b8-N2")


def test_asv_selection_names_single_cells_as_asv_writes_them():
    width, steps = campaign.ASV_CELL["cuda"]
    time_expr, peak_expr = campaign.asv_selection("cuda")
    name = "bench_solvers.MLPForwardBackward.{}('{}', {}, {})"
    assert re.search(time_expr, name.format("track_time_ms", "rampde-bf16", width, steps))
    assert re.search(time_expr, name.format("track_time_ms", "torchdiffeq-fp32", width, steps))
    assert not re.search(time_expr, name.format("track_time_ms", "torchdiffeq-tf32", width, steps))
    assert not re.search(time_expr, name.format("track_time_ms", "rampde-bf16-fast", width, steps))
    assert not re.search(time_expr, name.format("track_time_ms", "rampde-bf16", width, steps * 2))
    assert re.search(peak_expr, name.format("track_peak_alloc_bytes", "rampde-bf16", width, steps))
    assert not re.search(peak_expr, name.format("track_peak_alloc_bytes", "torchdiffeq-fp32", width, steps))
    assert not re.search(peak_expr, name.format("track_time_ms", "rampde-bf16", width, steps))


def test_run_commands_stops_a_command_at_its_limit_and_keeps_the_others(tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    start = time.monotonic()
    codes, stopped = campaign.run_commands(
        [[PY, "-c", "print('done')"], [PY, "-c", "import time; time.sleep(60)"]], 2.0, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"}, logs=logs)
    assert stopped
    assert codes[0] == 0 and codes[1] != 0
    assert time.monotonic() - start < campaign.GRACE_S  # SIGINT ended the sleeper
    assert "done" in logs[0].read_text() and logs[1].read_text().startswith("$ ")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_stopping_a_command_also_ends_what_it_started_in_a_process_group_of_its_own(tmp_path):
    """As asv does with each benchmark: a grandchild in its own process group, deaf to SIGINT."""
    pid_file = tmp_path / "grandchild.pid"
    grandchild = ("import os, signal, time; os.setpgid(0, 0); signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    parent = f"import subprocess, time; subprocess.Popen([{PY!r}, '-c', {grandchild!r}]); time.sleep(120)"
    codes, stopped = campaign.run_commands([[PY, "-c", parent]], 3.0, cwd=tmp_path, env={},
                                           logs=[tmp_path / "p.log"])
    assert stopped and codes[0] != 0
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the grandchild outlived the stop"


def test_run_commands_reports_failures_without_stopping(tmp_path):
    codes, stopped = campaign.run_commands([[PY, "-c", "raise SystemExit(3)"]], 30.0, cwd=tmp_path, env={},
                                           logs=[tmp_path / "x.log"])
    assert (codes, stopped) == ([3], False)


def test_pack_holds_new_and_changed_reports_and_the_logs_only(tmp_path):
    (tmp_path / "reports" / "gpu").mkdir(parents=True)
    old = tmp_path / "reports" / "gpu" / "old.csv"
    kept = tmp_path / "reports" / "gpu" / "kept.csv"
    old.write_text("a\n")
    kept.write_text("b\n")
    before = campaign.snapshot(tmp_path)
    old.write_text("a\nmore\n")
    (tmp_path / "reports" / "gpu" / "new.json").write_text("{}")
    (tmp_path / "reports" / "training" / "checkpoints").mkdir(parents=True)
    (tmp_path / "reports" / "training" / "checkpoints" / "run.pt").write_bytes(b"x")
    (tmp_path / "reports" / "gpu" / "results.csv.part").write_text("half")
    logs = tmp_path / ".campaign" / "logs"
    logs.mkdir(parents=True)
    (logs / "perf.log").write_text("log")
    target = tmp_path / "out" / "campaign.tgz"
    count = campaign.pack(tmp_path, campaign.changed_files(tmp_path, before), [logs, tmp_path / "absent"], target)
    with tarfile.open(target) as tar:
        names = sorted(tar.getnames())
    assert names == [".campaign/logs/perf.log", "reports/gpu/new.json", "reports/gpu/old.csv"]
    assert count == 3
    assert not list(target.parent.glob("*.part"))


def _rows(task: str, competitor: str, epochs: range, metric: float) -> pd.DataFrame:
    return pd.DataFrame({"task": task, "competitor": competitor, "seed": 0, "epoch": list(epochs),
                         "test_metric": metric})


def test_merge_training_joins_the_side_by_side_runs(tmp_path):
    ctx = campaign.Context(PY, "cuda", "nvidia-h200", root=tmp_path)
    parts = campaign.Stage(tmp_path).training
    for name, metric in (("torchdiffeq-fp32", 0.9), ("rampde-bf16", 0.8)):
        (parts / f"digits-{name}").mkdir(parents=True)
        _rows("digits", name, range(3), metric).to_csv(parts / f"digits-{name}" / "training.csv", index=False)
    target = tmp_path / "reports" / "training" / "nvidia-h200" / "training.csv"
    target.parent.mkdir(parents=True)
    pd.concat([_rows("digits", "rampde-bf16", range(2), 0.1), _rows("cnf", "rampde-bf16", range(2), 2.0)]
              ).to_csv(target, index=False)
    assert "8 training rows" in campaign.merge_training(ctx)
    merged = pd.read_csv(target)
    assert len(merged) == 3 + 3 + 2
    digits_bf16 = merged[(merged.task == "digits") & (merged.competitor == "rampde-bf16")]
    assert digits_bf16["test_metric"].tolist() == [0.8, 0.8, 0.8]  # the new run replaced the old rows
    assert not list(target.parent.glob("*.part"))


def test_merge_training_with_nothing_to_merge(tmp_path):
    ctx = campaign.Context(PY, "cpu", "cpu", root=tmp_path)
    assert campaign.merge_training(ctx) == "no training results to merge"


def test_run_campaign_packs_after_each_step_and_skips_what_has_no_time(tmp_path):
    def write(name: str):
        return lambda ctx: [[PY, "-c", f"import pathlib; p = pathlib.Path('reports/cpu/{name}.csv'); "
                                       "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('x')"]]

    steps = [campaign.Step("one", 20, write("one")),
             campaign.Step("two", None, write("two"), after=lambda ctx: "merged"),
             campaign.Step("three", None, write("three"))]
    ticks = iter([0.0, 0.0, 0.0, 5.0, 5.0, 10.0, 10.0, 300.0])
    ctx = campaign.Context(PY, "cpu", "cpu", root=tmp_path)
    target = tmp_path / "out.tgz"
    records = campaign.run_campaign(steps, ctx, budget_s=60.0, pack_to=target, env={},
                                    clock=lambda: next(ticks))
    assert [(r.name, r.exit_codes, r.skipped != "") for r in records] == [
        ("one", [0], False), ("two", [0], False), ("three", [], True)]
    assert records[0].limit_s == 20 and records[1].limit_s == 45  # 60 - 5 s gone - the pack's reserve
    assert records[1].after == "merged"
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
    assert {"reports/cpu/one.csv", "reports/cpu/two.csv", ".campaign/campaign.json",
            ".campaign/logs/one.log"} <= names
    summary = json.loads((tmp_path / ".campaign" / "campaign.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["one", "two", "three"]


def test_run_campaign_counts_the_setup_and_skips_a_step_whose_module_is_missing(tmp_path):
    ctx = campaign.Context(PY, "cpu", "cpu", root=tmp_path)
    ran = tmp_path / "ran.txt"
    touch = [[PY, "-c", f"open({str(ran)!r}, 'a').write('x')"]]
    steps = [campaign.Step("digits", 20, lambda c: touch, needs=("torch", "sklearn")),
             campaign.Step("rest", None, lambda c: touch, needs=("torch",))]
    modules = {"torch": "2.11.0", "sklearn": ""}
    records = campaign.run_campaign(steps, ctx, budget_s=60.0, pack_to=None, env={},
                                    start=time.monotonic() - 30.0, modules=modules)
    assert records[0].skipped == "cannot import sklearn" and records[0].exit_codes == []
    assert records[1].exit_codes == [0] and ran.read_text() == "x"
    assert records[1].limit_s <= 60 - 30 - campaign.PACK_RESERVE_S, "the 30 s of setup came off the budget"
    summary = json.loads((tmp_path / ".campaign" / "campaign.json").read_text())
    assert summary["modules"] == modules


def test_resolve_target_names_the_device_and_the_modules_versions():
    env = campaign.child_env(ROOT, "")
    device, gpu, modules = campaign.resolve_target(PY, "cpu", env, ROOT)
    assert (device, gpu) == ("cpu", "cpu")
    assert set(modules) == set(campaign.MODULES)
    assert modules["torch"] and modules["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert modules["pandas"] == pd.__version__


def test_a_sequential_step_runs_its_commands_in_order_within_one_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "MIN_STEP_S", 1.0)
    ctx = campaign.Context(PY, "cpu", "cpu", root=tmp_path)
    order = tmp_path / "order.txt"

    def append(word: str) -> list[str]:
        return [PY, "-c", f"open({str(order)!r}, 'a').write({word!r})"]

    both = campaign.Step("both", 30, lambda c: [append("a"), append("b")], sequential=True)
    cut = campaign.Step("cut", 2, lambda c: [[PY, "-c", "import time; time.sleep(60)"], append("c")],
                        sequential=True)
    records = campaign.run_campaign([both, cut], ctx, budget_s=120.0, pack_to=None, env={})
    assert order.read_text() == "ab"  # in order; the command after the stopped one never ran
    assert records[0].exit_codes == [0, 0] and not records[0].stopped
    assert records[1].stopped and len(records[1].exit_codes) == 1


def test_perf_runs_the_headline_cells_first_on_a_gpu():
    commands = campaign._perf(campaign.Context(PY, "cuda", "nvidia-h200"))
    assert [c[c.index("--widths") + 1] if "--widths" in c else "all" for c in commands] == ["2048", "128", "all",
                                                                                          "all"]
    assert all(c[c.index("--out") + 1] == "reports/nvidia-h200" for c in commands)

    def competitors(command):
        names = command[command.index("--competitors") + 1:]
        return names[:next((i for i, n in enumerate(names) if n.startswith("--")), len(names))]

    from rampde.bench.suites import PERF_COMPETITORS

    graphs = {"rampde-fp16-graph", "rampde-bf16-graph"}
    assert all(set(competitors(c)) == set(PERF_COMPETITORS) - graphs for c in commands[:3])
    assert set(competitors(commands[3])) == graphs, "the graph captures last, in a process of their own"


def test_command_line_errors_name_the_bad_value(capsys):
    assert campaign.main(["plan", "--steps", "perf", "nope"]) == 2
    assert "unknown step(s) nope" in capsys.readouterr().err
    assert campaign.main(["run", "--budget", "0"]) == 2
    assert "--budget must be positive" in capsys.readouterr().err


def test_plan_prints_each_step_with_its_commands(capsys):
    assert campaign.main(["plan", "--device", "cpu", "--steps", "perf", "asv"]) == 0
    out = capsys.readouterr().out
    assert "perf: up to 150 s" in out and "--suite perf" in out and "tools/asv_history.py" in out


def test_asv_benchmark_path_puts_the_commit_first_and_drops_this_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{tmp_path / 'site'}")
    assert asv_history.benchmark_path(tmp_path / "tree").split(":") == [str(tmp_path / "tree"),
                                                                          str(tmp_path / "site")]


def test_asv_history_uses_the_machine_name_it_is_given(monkeypatch):
    """The campaign names the GPU model it already knows: no torch import and CUDA context to ask."""
    calls = []
    monkeypatch.setattr(asv_history, "run", lambda cmd, **kwargs: calls.append(cmd))
    monkeypatch.setattr(asv_history, "machine_name", lambda: pytest.fail("probed the device for a name"))
    assert asv_history.main(["0123456789abcdef", "--machine", "nvidia-h200", "--quick"]) == 0
    asv = [c for c in calls if c[1:3] == ["-m", "asv"]]
    assert [c[3] for c in asv] == ["machine", "run"]
    assert all(c[c.index("--machine") + 1] == "nvidia-h200" for c in asv)
    assert "--set-commit-hash" in asv[1] and "0123456789abcdef" in asv[1]


def _wheel(folder: Path, name: str, *requires: str) -> Path:
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_missing_requirements_names_what_neither_the_wheels_nor_the_image_give(tmp_path):
    wheels = [_wheel(tmp_path, "asv", "asv-runner>=0.2", "tabulate", "virtualenv", "colorama; platform_system == 'Windows'",
                     "tomli; python_version < '3.11'", "sphinx; extra == 'doc'", "lazy-thing"),
              _wheel(tmp_path, "asv_runner", "importlib-metadata")]
    assert campaign.missing_requirements(wheels, "3.12") == ["asv: lazy-thing", "asv_runner: importlib-metadata"]
    assert "asv: tomli; python_version < '3.11'" in campaign.missing_requirements(wheels, "3.10")


def test_asv_environment_is_named_after_a_fixed_wrapper_of_this_python():
    import subprocess

    wrapper = asv_history.stable_python()
    assert wrapper.name == "python" and wrapper.parent.name == "rampde-asv"
    done = subprocess.run([str(wrapper), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == sys.prefix  # the same interpreter, its environment included


def test_every_gpu_command_parses_with_its_tools_own_parser(tmp_path):
    """The one GPU call cannot afford a typo: each command of the cuda plan goes through the
    parser (and the grid planning) of the program it runs, without running it."""
    import argparse

    from rampde.bench import cli, profiling, training_cli

    ctx = campaign.Context(PY, "cuda", "nvidia-h200")
    seen = set()
    for step in campaign.STEPS:
        for cmd in step.commands(ctx):
            assert cmd[0] == PY
            args = cmd[1:]
            if args[:2] == ["-m", "rampde.bench"] and args[2] == "train":
                parsed = training_cli.add_train_arguments(argparse.ArgumentParser()).parse_args(args[3:])
                assert parsed.device == "cuda" and parsed.size == "full"
                seen.add("train")
            elif args[:2] == ["-m", "rampde.bench"]:
                parsed = cli.build_parser().parse_args(args[2:])
                suite, cells, repeats, warmup = cli._plan(parsed, torch.device("cuda"))
                assert cells and (repeats, warmup) == (suite.repeats, suite.warmup)  # resumable cell ids
                seen.add(f"run-{suite.name}")
            elif args[:2] == ["-m", "rampde.bench.profiling"]:
                parsed = profiling.build_parser().parse_args(args[2:])
                if parsed.command == "gemm":
                    assert parsed.device == "cuda" and parsed.out == "reports/nvidia-h200/perf"
                else:
                    assert profiling._cells(parsed, torch.device("cuda"), profiling.DEFAULT_WORKLOADS)
                seen.add(parsed.command)
            elif args[:2] == ["-m", "pytest"]:
                # pytest's own parser: collect only, with the same arguments. A usage error exits
                # with 4; 5 is "nothing collected" (the benchmarks' grid is the CPU's here).
                # Their report files go to a temporary folder, not into reports/.
                private = [re.sub(r"^(--junitxml|--benchmark-json)=.*/", rf"\1={tmp_path}/", a) for a in args]
                done = subprocess.run([PY, *private, "--collect-only"], cwd=campaign.ROOT, capture_output=True,
                                      text=True, timeout=120)
                if "tests/test_step_graphs.py" in args:
                    assert done.returncode == 0, done.stdout + done.stderr
                    assert any(a.startswith("--junitxml=reports/nvidia-h200/") for a in args)
                    assert "test_real_capture_on_cuda" in done.stdout
                    seen.add("pytest-graphs")
                else:
                    assert done.returncode in (0, 5), done.stdout + done.stderr
                    assert "--benchmark-only" in args and any(a.startswith("--benchmark-json=reports/") for a in args)
                    seen.add("pytest-benchmarks")
            else:
                assert args[0] == "tools/asv_history.py"
                parsed = asv_history.build_parser().parse_args(args[1:])
                assert parsed.count == 3 and len(parsed.bench) == 2 and parsed.quick
                seen.add("asv")
    assert seen == {"train", "run-perf", "run-quick", "ablate", "profile", "pytest-graphs", "pytest-benchmarks", "asv",
                    "gemm"}


def _git_tree(path: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout.strip()

    path.mkdir()
    git("init", "-q", "-b", "main")
    (path / "solver.py").write_text("VERSION = 1\n")
    git("add", "solver.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return git("rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("changed", [False, True])
def test_restored_history_labels_a_tree_newer_than_its_bundle(tmp_path, capsys, changed):
    """The device gets the tree without .git: the bundle gives the history back. A bundle older
    than the tree (prepare not rerun) must not lend its commit to results of newer code."""
    source = tmp_path / "source"
    sha = _git_tree(source)
    copy = tmp_path / "copy"
    copy.mkdir()
    stage = campaign.Stage(copy)
    stage.dir.mkdir()
    subprocess.run(["git", "bundle", "create", "-q", str(stage.bundle), "main"], cwd=source, check=True,
                   capture_output=True)
    stage.commit_file.write_text(sha + "\n")
    (copy / "solver.py").write_text("VERSION = 2\n" if changed else "VERSION = 1\n")
    (copy / "solver.py").chmod(0o755)  # a mode the copy may change is not a change of code
    commit = campaign.restore_history(copy)
    out = capsys.readouterr().out
    assert "git history restored" in out
    if changed:
        assert commit == f"{sha}+modified" and "WARNING: tracked files differ" in out
        assert campaign.child_env(copy, commit)["RAMPDE_COMMIT"] == f"{sha}+modified"
    else:
        assert commit == sha and "WARNING" not in out
