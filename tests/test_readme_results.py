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
    assert "| digits | rampde-bf16 | 2 | 0.9480 (accuracy) | -0.0020 |" in training
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
    assert readme.read_text().count(readme_results.NO_GPU) == 3


def test_unknown_block_and_missing_readme(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:nope -->\n<!-- /results:nope -->\n")
    with pytest.raises(ValueError, match="unknown README block.*nope"):
        readme_results.main(["--readme", str(readme)])
    assert readme_results.main(["--readme", str(tmp_path / "none.md")]) == 2
    assert "no file" in capsys.readouterr().err


def test_the_repository_readme_matches_its_committed_results():
    assert readme_results.stale_blocks(ROOT / "README.md", ROOT) == [], "run python tools/readme_results.py"
