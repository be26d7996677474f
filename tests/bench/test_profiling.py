"""rampde.bench.profiling, the command line of the ablation and the profiler: every bad value
refused naming its option, and the names other code imports from here."""

from __future__ import annotations

import pytest
import torch

from rampde.bench import ablation, kernel_profile, profiling
from rampde.bench.profiling import main


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny cells on a shared machine run far faster than with several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("argv, option", [
    (["ablate", "--widths", "12"], "--widths"),
    (["ablate", "--batch", "0"], "--batch"),
    (["ablate", "--steps", "x"], "--steps"),
    (["ablate", "--workload", "rnn"], "--workload"),
    (["ablate", "--variants", "rampde-bf32"], "--variants"),
    (["ablate", "--repeats", "0"], "--repeats"),
    (["ablate", "--warmup", "-1"], "--warmup"),
    (["ablate", "--device", "tpu"], "--device"),
    (["ablate", "--threads", "0"], "--threads"),
    (["profile", "--competitors", "torchdiffeq-fp64"], "--competitors"),
    (["profile", "--channels-last"], "--channels-last"),
    (["profile", "--top", "0"], "--top"),
])
def test_bad_values_exit_2_naming_the_option(argv, option, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)] + ([] if "--device" in argv else ["--device", "cpu"])) == 2
    err = capsys.readouterr().err
    assert option in err and "error" in err
    assert not (tmp_path / "ablation.csv").exists()


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "ablate" in capsys.readouterr().err


def test_the_moved_names_are_still_importable_from_here():
    """Other code (tests, tools) imports them from rampde.bench.profiling: the same objects."""
    for name in sorted(set(profiling.__all__) - {"main"}):
        home = ablation if hasattr(ablation, name) else kernel_profile
        assert getattr(profiling, name) is getattr(home, name), name
