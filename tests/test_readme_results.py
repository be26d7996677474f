"""tools/readme_results.py: the README's GPU tables come from the committed data, and stay in sync."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from rampde.bench.results import COLUMNS, write_csv_atomic

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
readme_results = importlib.util.module_from_spec(spec)
sys.modules["readme_results"] = readme_results
spec.loader.exec_module(readme_results)

H200 = "NVIDIA H200"
# competitor: (precision, ms, peak bytes, gradient error)
FIGURES = {
    "torchdiffeq-fp32": ("fp32", 700.0, 11e9, 1e-7),
    "torchdiffeq-tf32": ("tf32", 350.0, 11e9, 1e-4),
    "autocast-fp16": ("fp16", 400.0, 6e9, 0.07),
    "autocast-bf16": ("bf16", 380.0, 6e9, 0.09),
    "rampde-fp16": ("fp16", 300.0, 1.2e9, 2e-3),
    "rampde-bf16": ("bf16", 200.0, 1.2e9, 1e-2),
}
README = """# x

<!-- results:claims -->
old
<!-- /results:claims -->

text between

<!-- results:targets -->
<!-- /results:targets -->

<!-- results:training -->
<!-- /results:training -->

<!-- results:dashboard -->
<!-- /results:dashboard -->
"""


def _row(competitor: str, width: int, device: str = "cuda", gpu: str = H200) -> dict:
    precision, ms, peak, err = FIGURES[competitor]
    row = {c: math.nan for c in COLUMNS}
    row.update(gpu=gpu, device=device, competitor=competitor, precision=precision, workload="mlp", method="rk4",
               width=width, batch=2048, steps=64, repeats=5, warmup=2, status="ok", message="", time_ms_median=ms,
               peak_mem_bytes=peak, grad_err_params=err, grad_err_y0=err, tflops=100.0,
               tf32=competitor == "torchdiffeq-tf32", cudnn_tf32=False, cudnn_benchmark=False, torch="2.11.0+cu130",
               cuda="13.0", driver="580.159", compute_capability="9.0", torchdiffeq="0.2.5", rampde="0.1.0",
               commit="0123456789abcdef", timestamp="2026-12-10T10:00:00+00:00",
               cell_id=f"{gpu}|{competitor}|{width}|{device}")
    return row


def _training(device: str) -> pd.DataFrame:
    rows = []
    for competitor, metric in (("torchdiffeq-fp32", 0.95), ("rampde-bf16", 0.948)):
        for epoch in range(3):
            rows.append(dict(task="digits", competitor=competitor, precision="bf16", epoch=epoch, train_loss=1.0,
                             test_metric=metric - 0.1 * (2 - epoch), metric_name="accuracy", wall_s=float(epoch),
                             peak_mem_bytes=1e6, skipped_steps=0, scaler_retries=0, seed=0, device=device,
                             gpu=H200 if device == "cuda" else "cpu", torch="2.11.0+cu130", commit="0123456789ab",
                             timestamp="2026-12-10T10:00:00+00:00"))
    return pd.DataFrame(rows)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    rows = [_row(c, w) for w in (256, 2048) for c in FIGURES] + [_row("rampde-bf16", 16, device="cpu", gpu="cpu")]
    (tmp_path / "reports" / "nvidia-h200").mkdir(parents=True)
    write_csv_atomic(pd.DataFrame(rows), tmp_path / "reports" / "nvidia-h200" / "results.csv")
    (tmp_path / "reports" / "training" / "nvidia-h200").mkdir(parents=True)
    pd.concat([_training("cuda"), _training("cpu").assign(test_metric=0.1)]).to_csv(
        tmp_path / "reports" / "training" / "nvidia-h200" / "training.csv", index=False)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_blocks_hold_the_gpu_tables_and_no_cpu_row(repo: Path):
    assert readme_results.main(["--readme", str(repo / "README.md")]) == 0
    text = (repo / "README.md").read_text()
    claims = text[text.index("<!-- results:claims -->"):text.index("<!-- /results:claims -->")]
    assert "**NVIDIA H200**: 12 cells (12 ok), measured 2026-12-10" in claims  # the CPU row left out
    assert "torch 2.11.0+cu130" in claims and "commit 0123456" in claims and "TF32 off" in claims
    assert "| rampde-bf16 | about 2× faster | torchdiffeq-fp32 | held | 3.5x (mlp w=256 b=2048 N=64)" in claims
    assert "| rampde-fp16 | accuracy kept | autocast-fp16 | held | 0.2% (naive 7%)" in claims
    assert "old" not in claims and "text between" in text
    targets = text[text.index("<!-- results:targets -->"):text.index("<!-- /results:targets -->")]
    assert "| NVIDIA H200 | speed-bf16-vs-tf32 |" in targets and "### Performance targets" not in targets
    training = text[text.index("<!-- results:training -->"):text.index("<!-- /results:training -->")]
    assert "| digits | rampde-bf16 | 2 | 0.9480 (accuracy) | -0.20 points (worse; goal: ≥ -0.3) |" in training
    assert "| digits | torchdiffeq-fp32 | 2 | 0.9500 (accuracy) | the baseline |" in training
    assert "0.1000" not in training  # the CPU run is not a GPU result
    assert "comes with the first committed GPU results" in text
    assert readme_results.main(["--readme", str(repo / "README.md"), "--check"]) == 0


def test_check_finds_a_stale_block(repo: Path, capsys):
    readme = repo / "README.md"
    readme_results.main(["--readme", str(readme)])
    (repo / "docs").mkdir()
    (repo / "docs" / "dashboard.png").write_bytes(b"\x89PNG")
    assert readme_results.main(["--readme", str(readme), "--check"]) == 1
    assert "stale block(s)" in capsys.readouterr().err and readme_results.stale_blocks(readme, repo) == ["dashboard"]
    readme_results.main(["--readme", str(readme)])
    assert "![The dashboard built from the committed GPU results](docs/dashboard.png)" in readme.read_text()


def test_without_gpu_results_every_block_says_so(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert readme_results.main(["--readme", str(readme)]) == 0
    assert readme.read_text().count(readme_results.NO_GPU) == 3  # claims, targets, training


def test_unknown_block_and_missing_readme(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:nope -->\n<!-- /results:nope -->\n")
    with pytest.raises(ValueError, match="unknown README block.*nope"):
        readme_results.main(["--readme", str(readme)])
    assert readme_results.main(["--readme", str(tmp_path / "none.md")]) == 2
    assert "no file" in capsys.readouterr().err


def test_the_repository_readme_matches_its_committed_results():
    assert readme_results.stale_blocks(ROOT / "README.md", ROOT) == [], "run python tools/readme_results.py"


def test_the_readme_counts_the_registered_competitors():
    import re

    from rampde.bench.competitors import list_competitors

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
    said = re.search(r"^(\w+) competitors, one registry", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert said, "the README's Benchmarks section no longer says how many competitors there are"
    assert said.group(1).lower() == words[len(list_competitors())]


def _perf_rows(tmp_path: Path) -> None:
    """An ablation and a GEMM probe table as the tools write them: a GPU and a CPU row each."""
    from rampde.bench.gemm_probe import GEMM_COLUMNS
    from rampde.bench.profiling import ABLATION_COLUMNS

    def ablation(variant, ms, vs_default, peak, status="ok", device="cuda", width=2048):
        row = {c: math.nan for c in ABLATION_COLUMNS}
        row.update(gpu=H200 if device == "cuda" else "cpu", device=device, workload="mlp", width=width, batch=2048,
                   steps=64, variant=variant, repeats=5, time_ms_median=ms, speedup_vs_default=vs_default,
                   peak_mem_bytes=peak, status=status, commit="0123456789ab")
        return row

    def gemm(precision, n, k, tflops, vs_aligned, kernel, status="ok"):
        row = {c: math.nan for c in GEMM_COLUMNS}
        triple_us = 3 * 2 * 2048 * n * k / (tflops * 1e12) * 1e6 if status == "ok" else math.nan
        row.update(gpu=H200, device="cuda", precision=precision, m=2048, n=n, k=k, tflops=tflops,
                   time_us_median=triple_us, forward_us_median=triple_us / 3, vs_aligned=vs_aligned,
                   top_kernel=kernel, status=status, commit="0123456789ab")
        return row

    perf = tmp_path / "reports" / "nvidia-h200" / "perf"
    perf.mkdir(parents=True)
    pd.DataFrame([ablation("torchdiffeq-fp32", 700.0, math.nan, 11 * 2**30),
                  ablation("rampde-bf16", 250.0, 1.0, 2**30),
                  ablation("rampde-bf16 fuse", 200.0, 1.25, 2**30),
                  ablation("rampde-bf16", 30.0, 1.0, 2**28, width=256),
                  ablation("rampde-bf16 storage=activations", math.nan, math.nan, math.nan, status="oom"),
                  ablation("rampde-bf16", 9.0, 1.0, math.nan, device="cpu")]).to_csv(perf / "ablation.csv", index=False)
    pd.DataFrame([gemm("bf16", 2048, 2048, 600.0, 1.0, "sm90_gemm_aligned"),
                  gemm("bf16", 2048, 2049, 200.0, 1 / 3, "sm80_gemm_align2"),
                  gemm("fp32", 2048, 2048, 50.0, 1.0, "sgemm"),
                  gemm("fp32", 2048, 2049, math.nan, math.nan, math.nan, status="oom")]).to_csv(perf / "gemm.csv",
                                                                                             index=False)


def test_ablation_and_gemm_blocks_come_from_the_perf_tables(tmp_path: Path):
    _perf_rows(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:ablation -->\n<!-- /results:ablation -->\n"
                      "<!-- results:gemm -->\n<!-- /results:gemm -->\n")
    assert readme_results.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    ablation = text[text.index("<!-- results:ablation -->"):text.index("<!-- /results:ablation -->")]
    assert "**NVIDIA H200** (commit 0123456; median of 5 runs;" in ablation
    assert "| variant | mlp 2048, 64 steps | mlp 256, 64 steps |" in ablation
    assert "| `torchdiffeq-fp32` | 700 ms, 11 GiB | — |" in ablation
    assert "| `rampde-bf16` | 250 ms, x1.00, 1 GiB | 30 ms, x1.00, 0.25 GiB |" in ablation
    assert "| `rampde-bf16 fuse` | 200 ms, x1.25, 1 GiB | — |" in ablation
    assert "| `rampde-bf16 storage=activations` | oom | — |" in ablation
    assert "9 ms" not in ablation  # the CPU row is not a GPU result
    gemm = text[text.index("<!-- results:gemm -->"):text.index("<!-- /results:gemm -->")]
    assert "3 of 4 shapes measured" in gemm
    assert "| bf16 | 2048 | 2048 | 600 | 200 | 0.333 | `sm80_gemm_align2` |" in gemm
    assert "| fp32 | 2048 | 2048 | 50 | oom | — | — |" in gemm
    # The ceiling of the efficiency target: bf16 only (fp32 has no tensor-core ceiling row).
    from rampde.bench.gemm_probe import mlp_gemm_ceiling
    from rampde.bench.gpu_peaks import dense_fp16_peak_tflops

    rows = pd.read_csv(tmp_path / "reports" / "nvidia-h200" / "perf" / "gemm.csv")
    ceiling = mlp_gemm_ceiling(rows, 2048, "bf16", dense_fp16_peak_tflops(H200))
    # The layers' triples at 200 TFLOP/s (k = 2049) and 600 (k = 2048): their work over their time;
    # the recomputed forward GEMMs (a third of a triple here) add a third of the time.
    together = (2049 + 2048) / (2049 / 200.0 + 2048 / 600.0)
    assert ceiling["activations"] == pytest.approx(together / dense_fp16_peak_tflops(H200))
    assert ceiling["states"] == pytest.approx(ceiling["activations"] * 3 / 4)
    assert (f"| bf16 | 2048 | {100 * ceiling['states']:.0f}% | {100 * ceiling['activations']:.0f}% |"
            in gemm)
    assert "| fp32 | 2048 | " not in gemm.split("If its GEMMs")[1]
    assert readme_results.main(["--readme", str(readme), "--check"]) == 0


def test_short_commits_keep_the_modified_label():
    rows = pd.DataFrame({"commit": ["0123456789abcdef+modified", "fedcba9876543210", "nan", ""]})
    assert readme_results._commits(rows) == "0123456+modified, fedcba9"
