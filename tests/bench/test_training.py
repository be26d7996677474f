"""The train suite (rampde.bench.training) on the CPU, at the "tiny" size.

Parity figures measured on the CPU (torch 2.13.0, 2 shared cores) with the run of
``test_bf16_training_keeps_fp32_accuracy`` (digits, tiny: 256 training / 120 test images, 8
channels, 4 rk4 steps, seed 0, 8 epochs): test accuracy 0.917 for torchdiffeq-fp32 and rampde-bf16
(and for the naive autocast-bf16, measured alongside but not run here); every epoch within one
test image (0.0083) of fp32; final training loss 0.0813 (fp32), 0.0810 (rampde-bf16), 0.0821
(autocast-bf16). The stated margin, 0.05 (6 of 120 images), leaves room for other CPUs' bf16
kernels. At the full size (1437/360 images, 32 channels, 8 steps, 5 epochs) all three reach 0.9722.
"""

from __future__ import annotations

import argparse
import functools
import math

import pandas as pd
import pytest
import torch
import torchdiffeq

pytest.importorskip("sklearn")
pytest.importorskip("plotly")

from rampde.bench import training, training_cli  # noqa: E402
from rampde.bench.training import (  # noqa: E402
    COLUMNS,
    TASKS,
    TRAINING_RECIPES,
    TrainingEvent,
    UnknownNameError,
    parity_table,
    run_training,
    training_figures,
)
from rampde.bench.training_cli import add_train_arguments, main_train  # noqa: E402

DIGITS_COMPETITORS = ["torchdiffeq-fp32", "autocast-fp16", "rampde-bf16"]
CURVE = ["epoch", "train_loss", "test_metric", "skipped_steps", "scaler_retries"]
PARITY_MARGIN = 0.05  # accuracy; measured difference 0.0 (see the module docstring)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    events: list[TrainingEvent] = []
    df = run_training("digits", DIGITS_COMPETITORS, epochs=2, out=out, device="cpu", size="tiny",
                      progress=events.append)
    return out, df, events


def test_names():
    assert list(TASKS) == ["digits", "cnf"]
    for name in ("torchdiffeq-fp32", "autocast-fp16", "autocast-bf16", "rampde-fp16", "rampde-bf16",
                 "rampde-fp32", "checkpoint-step", "reversible"):
        assert name in TRAINING_RECIPES
    assert TRAINING_RECIPES["rampde-fp16"].grad_scaler and TRAINING_RECIPES["rampde-fp16"].adjoint_scaler
    assert TRAINING_RECIPES["autocast-fp16"].grad_scaler and not TRAINING_RECIPES["autocast-fp16"].adjoint_scaler
    assert TRAINING_RECIPES["torchdiffeq-fp32"].autocast_dtype is None


def test_digits_end_to_end(digits_run):
    out, df, events = digits_run
    csv = pd.read_csv(out / "training.csv")
    assert list(csv.columns) == COLUMNS
    assert len(df) == len(csv) == len(DIGITS_COMPETITORS) * 3  # epochs 0, 1, 2
    assert set(df["competitor"]) == set(DIGITS_COMPETITORS)
    assert (df["metric_name"] == "accuracy").all() and (df["device"] == "cpu").all()
    assert df["test_metric"].between(0, 1).all()
    trained = df[df["epoch"] > 0]
    assert trained["train_loss"].map(math.isfinite).all()
    assert trained["peak_mem_bytes"].isna().all(), "no allocator peak on the CPU"
    assert (trained.groupby("competitor")["wall_s"].diff().dropna() > 0).all(), "wall time is cumulative"
    # same seed, same data, same initial weights: every competitor starts from the same accuracy
    assert df[df["epoch"] == 0]["test_metric"].nunique() == 1
    final = df[df["epoch"] == 2].set_index("competitor")["test_metric"]
    assert final["torchdiffeq-fp32"] > 0.4, "the tiny classifier learns something in two epochs"
    assert {e.kind for e in events} == {"start", "epoch"}
    assert (out / "checkpoints").is_dir() and len(list((out / "checkpoints").glob("*.pt"))) == 3


def test_cnf_end_to_end(tmp_path):
    names = list(TRAINING_RECIPES)
    df = run_training("cnf", names, epochs=2, out=tmp_path, device="cpu", size="tiny")
    assert len(df) == len(names) * 3
    assert (df["metric_name"] == "nll").all()
    assert df["test_metric"].map(math.isfinite).all()
    by = df[df["epoch"] == 2].set_index("competitor")
    start = df[df["epoch"] == 0]["test_metric"].iloc[0]
    assert (by["test_metric"] < start).all(), "maximum likelihood lowers the test NLL"
    # fp32 recipes solve the same rk4 (3/8 rule) scheme: the same curves up to round-off
    for name in ("rampde-fp32", "checkpoint-step"):
        assert by.loc[name, "test_metric"] == pytest.approx(by.loc["torchdiffeq-fp32", "test_metric"], rel=1e-5)
    for name in names:  # 16-bit recipes stay close to fp32 on this short run
        assert by.loc[name, "test_metric"] == pytest.approx(by.loc["torchdiffeq-fp32", "test_metric"], abs=0.02)


def test_bf16_training_keeps_fp32_accuracy(tmp_path):
    df = run_training("digits", ["torchdiffeq-fp32", "rampde-bf16"], epochs=8, out=tmp_path, device="cpu",
                      size="tiny")
    acc = df[df["epoch"] == 8].set_index("competitor")["test_metric"]
    assert acc["torchdiffeq-fp32"] > 0.85
    assert abs(acc["rampde-bf16"] - acc["torchdiffeq-fp32"]) <= PARITY_MARGIN


class _Interrupt:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, event: TrainingEvent) -> None:
        if event.kind == "epoch" and event.epoch == self.epoch:
            raise KeyboardInterrupt


# rampde-fp16 carries GradScaler and DynamicScaler state, autocast-bf16 none; digits is the dearer task
@pytest.mark.parametrize("task, names, epochs", [("digits", ["rampde-fp16"], 2),
                                                 ("cnf", ["rampde-fp16", "autocast-bf16"], 3)])
def test_interrupted_run_resumes_to_the_same_curves(tmp_path, task, names, epochs):
    whole = run_training(task, names, epochs=epochs, out=tmp_path / "whole", device="cpu", size="tiny")
    with pytest.raises(KeyboardInterrupt):
        run_training(task, names, epochs=epochs, out=tmp_path / "split", device="cpu", size="tiny",
                     progress=_Interrupt(epoch=1))
    partial = pd.read_csv(tmp_path / "split" / "training.csv")
    assert partial["epoch"].max() == 1 and set(partial["competitor"]) == {"rampde-fp16"}
    events: list[TrainingEvent] = []
    resumed = run_training(task, names, epochs=epochs, out=tmp_path / "split", device="cpu", size="tiny",
                           progress=events.append)
    assert events[0].kind == "start" and events[0].epoch == 1, "resumed after epoch 1, not from scratch"
    pd.testing.assert_frame_equal(resumed[["competitor", *CURVE]], whole[["competitor", *CURVE]], check_exact=True)
    # a third call finds both runs finished and trains nothing
    events.clear()
    again = run_training(task, names, epochs=epochs, out=tmp_path / "split", device="cpu", size="tiny",
                         progress=events.append)
    assert [e.kind for e in events] == ["skipped"] * len(names)
    pd.testing.assert_frame_equal(again, resumed)


def test_skipped_steps_are_counted(tmp_path, monkeypatch):
    # A loss scale of 2**24 overflows fp16 gradients: GradScaler skips steps and halves the scale.
    big_scale = functools.partial(torch.amp.GradScaler, init_scale=2.0**24)
    monkeypatch.setattr(torch.amp, "GradScaler", big_scale)
    df = run_training("cnf", ["autocast-fp16", "rampde-fp16", "autocast-bf16"], epochs=2, out=tmp_path,
                      device="cpu", size="tiny")
    skipped = df[df["epoch"] == 2].set_index("competitor")["skipped_steps"]
    assert 0 < skipped["autocast-fp16"] <= 8  # 8 steps in all
    # The CNF's fp16 work all lies in the ODE block, whose adjoint rampde rescales per step from its
    # own magnitude: the loss scale never reaches an fp16 tensor unscaled, so nothing overflows.
    assert skipped["rampde-fp16"] == 0
    assert skipped["autocast-bf16"] == 0, "no GradScaler for bf16"
    assert df.groupby("competitor")["skipped_steps"].is_monotonic_increasing.all()


def test_out_folder_with_other_settings_is_refused(digits_run):
    out, _, _ = digits_run
    with pytest.raises(ValueError, match="size='tiny' there, 'full' now"):
        run_training("digits", ["autocast-fp16"], epochs=3, out=out, device="cpu", size="full")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "mnist"}, "unknown task 'mnist'; known tasks: digits, cnf"),
        ({"competitors": ["rampde-fp8"]}, "unknown competitor 'rampde-fp8'; known .*torchdiffeq-fp32"),
        ({"competitors": []}, "competitors is empty"),
        ({"competitors": ["rampde-bf16", "rampde-bf16"]}, "duplicates"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"size": "huge"}, "size must be one of"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"task": "digits", "competitors": ["rampde-bf16"], "epochs": 1, "out": tmp_path, "device": "cpu",
            "size": "tiny", **kwargs}
    with pytest.raises(ValueError, match=match):
        run_training(args.pop("task"), args.pop("competitors"), **args)
    assert not (tmp_path / "training.csv").exists()


def test_unknown_names_are_key_errors_too():
    with pytest.raises(KeyError) as info:
        training.get_recipe("nope")
    assert isinstance(info.value, UnknownNameError)
    assert str(info.value).startswith("unknown competitor 'nope'; known")
    with pytest.raises(KeyError):
        training.get_task("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_cuda_device_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="CUDA was asked for but torch sees no GPU"):
        run_training("digits", ["rampde-bf16"], epochs=1, out=tmp_path, device="cuda", size="tiny")


def test_parity_table_and_figures(digits_run):
    _, df, _ = digits_run
    table = parity_table(df)
    assert list(table["competitor"]) == DIGITS_COMPETITORS
    assert table.set_index("competitor").loc["torchdiffeq-fp32", "delta_vs_fp32"] == 0.0
    assert (table["epochs"] == 2).all()
    final = df[df["epoch"] == 2].set_index("competitor")["test_metric"]
    got = table.set_index("competitor")
    for name in DIGITS_COMPETITORS:
        assert got.loc[name, "delta_vs_fp32"] == pytest.approx(final[name] - final["torchdiffeq-fp32"])
    figures = training_figures(df, colors={"rampde-bf16": "#000000"})
    assert [title for title, _ in figures] == [
        "digits: test accuracy against epoch", "digits: test accuracy against wall time"]
    for _, fig in figures:
        lines = {trace.name: trace for trace in fig.data}
        assert set(lines) == set(DIGITS_COMPETITORS)
        assert lines["rampde-bf16"].line.color == "#000000"
        assert len(lines["autocast-fp16"].x) == 3
    assert parity_table(df.iloc[0:0]).empty


def test_parity_compares_a_cut_short_run_with_fp32_at_the_same_epoch(digits_run):
    _, df, _ = digits_run
    cut = df[~((df["competitor"] == "rampde-bf16") & (df["epoch"] == 2))]
    got = parity_table(cut).set_index("competitor")
    assert got.loc["rampde-bf16", "epochs"] == 1 and got.loc["torchdiffeq-fp32", "epochs"] == 2
    at_one = cut[cut["epoch"] == 1].set_index("competitor")["test_metric"]
    assert got.loc["rampde-bf16", "delta_vs_fp32"] == pytest.approx(at_one["rampde-bf16"]
                                                                      - at_one["torchdiffeq-fp32"])
    no_base_at_two = cut[~((cut["competitor"] == "torchdiffeq-fp32") & (cut["epoch"] == 2))]
    assert math.isnan(parity_table(no_base_at_two).set_index("competitor").loc["autocast-fp16", "delta_vs_fp32"])


def _parse(*argv: str) -> argparse.Namespace:
    return add_train_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_resumes_and_prints_the_table(digits_run, capsys):
    out, _, _ = digits_run
    args = _parse("--task", "digits", "--competitors", ",".join(DIGITS_COMPETITORS), "--epochs", "2",
                  "--out", str(out), "--device", "cpu", "--size", "tiny")
    assert main_train(args) == 0  # all four runs finished already: nothing is trained
    text = capsys.readouterr().out
    assert "digits: test accuracy after 2 epochs" in text and "autocast-fp16" in text


def test_cli_interrupted_while_printing_exits_130_with_the_results_whole(digits_run, capsys, monkeypatch):
    out, _, _ = digits_run
    before = (out / "training.csv").read_bytes()

    def interrupted(table):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_cli, "_format_tables", interrupted)  # where main_train looks it up
    args = _parse("--task", "digits", "--competitors", ",".join(DIGITS_COMPETITORS), "--epochs", "2",
                  "--out", str(out), "--device", "cpu", "--size", "tiny")
    assert main_train(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (out / "training.csv").read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--task", "mnist"), "--task: unknown task 'mnist'"),
        (("--competitors", "rampde-fp8"), "--competitors: unknown competitor 'rampde-fp8'"),
        (("--epochs", "0"), "--epochs must be an integer >= 1"),
        (("--device", "npu"), "--device: device must be"),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, message):
    assert main_train(_parse("--out", str(tmp_path), *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rampde-bench train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "training.csv").exists()


def test_cli_refuses_a_file_as_the_out_folder_before_training(tmp_path, capsys):
    taken = tmp_path / "run.log"
    taken.write_text("not a folder\n")
    assert main_train(_parse("--out", str(taken), "--task", "digits", "--size", "tiny", "--device", "cpu")) == 2
    assert f"--out: {taken} is a file; give a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder\n"


def test_cli_rejects_a_bad_size():
    with pytest.raises(SystemExit):
        _parse("--size", "huge")


def test_rng_devices_names_an_index_that_fork_rng_can_use(monkeypatch):
    """``torch.random.fork_rng`` reads each device's RNG state by index; ``cuda`` without one must
    become the current device's index (``None`` raises there, on a GPU only)."""
    assert training.rng_devices(torch.device("cpu")) == []
    assert training.rng_devices(torch.device("cuda", 2)) == [2]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    devices = training.rng_devices(torch.device("cuda"))
    assert devices == [5]
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(device) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: asked.append(device))
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        pass
    assert asked == [5, 5] and all(type(d) is int for d in asked)


def test_training_rows_take_the_campaigns_commit_label(monkeypatch):
    """Like the sweep's rows (``measure.environment``): ``RAMPDE_COMMIT`` first, so that a copy of
    the tree without git, or one newer than its commit, is labelled as the campaign says."""
    monkeypatch.setenv("RAMPDE_COMMIT", "0123456789abcdef+modified")
    assert training._environment(torch.device("cpu"))["commit"] == "0123456789abcdef+modified"
    monkeypatch.delenv("RAMPDE_COMMIT")
    monkeypatch.setattr("rampde.bench.environment.git_commit", lambda path=None: "")
    assert training._environment(torch.device("cpu"))["commit"] == "unknown"


def test_every_fp32_recipe_solves_to_the_end_state_of_rk4():
    """A recipe's solve gives y(t[-1]): the same rk4 (3/8 rule) end state for the fp32 recipes; the
    reversible scheme's first step is exactly one rk4 step (its second state starts equal to y0),
    and over several steps it stays within its coupling's drift of rk4."""
    from rampde.bench.workloads import MLPField

    torch.manual_seed(0)
    field = MLPField(8).double()
    y0 = torch.randn(4, 8, dtype=torch.float64)
    for t in (torch.tensor([0.0, 0.5], dtype=torch.float64), torch.linspace(0, 1, 9, dtype=torch.float64)):
        rk4 = torchdiffeq.odeint(field, y0, t, method="rk4")[-1]
        for name in ("torchdiffeq-fp32", "rampde-fp32", "checkpoint-step"):
            end = TRAINING_RECIPES[name].solve(field, y0, t)
            assert end.shape == y0.shape and torch.allclose(end, rk4, rtol=0, atol=1e-12), name
        reversible = TRAINING_RECIPES["reversible"].solve(field, y0, t)
        assert reversible.shape == y0.shape
        if len(t) == 2:
            assert torch.allclose(reversible, rk4, rtol=0, atol=1e-12)
        else:
            assert 0 < (reversible - rk4).abs().max() < 1e-3


def test_training_reexports_the_split_modules_and_runs_as_a_script():
    """``rampde.bench.training`` keeps the names of ``training_recipes`` and ``training_report``;
    ``python -m rampde.bench.training_cli`` is the command without the console script."""
    import subprocess
    import sys

    from rampde.bench import training_recipes, training_report

    assert training.TRAINING_RECIPES is training_recipes.TRAINING_RECIPES
    assert training.UnknownNameError is training_recipes.UnknownNameError
    assert training.parity_table is training_report.parity_table
    done = subprocess.run([sys.executable, "-m", "rampde.bench.training_cli", "--help"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("usage: rampde-bench train") and "--competitors" in done.stdout
