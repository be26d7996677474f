"""rampde.bench.kernel_profile on the CPU: the profiler end to end at tiny sizes, an
out-of-memory competitor as an entry, the CUDA summary from fake profiler events and the name
patterns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from rampde.bench import kernel_profile, sweep
from rampde.bench.ablation import PerfCell
from rampde.bench.competitors import Competitor
from rampde.bench.kernel_profile import (MARK, SUMMARY_KEYS, TOP_COLUMNS, categorise_kernel, categorise_op,
                                         run_profiles)
from rampde.bench.profiling import main

TINY = ["--device", "cpu", "--widths", "8", "--batch", "8", "--steps", "2", "--threads", "1"]
MLP = PerfCell("mlp", 8, 8, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- profile


def test_profile_end_to_end(tmp_path, capsys):
    code = main(["profile", *TINY, "--competitors", "torchdiffeq-fp32,rampde-bf16", "--repeats", "2",
                 "--warmup", "1", "--trace", "--out", str(tmp_path)])
    assert code == 0
    folder = tmp_path / "profile"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["device"] == "cpu" and set(summary["categories"]) == {"cuda", "cpu", "syncs", "launches"}
    assert set(summary["profiles"]) == {"torchdiffeq-fp32-mlp-w8-b8-s2", "rampde-bf16-mlp-w8-b8-s2"}
    for stem, entry in summary["profiles"].items():
        assert set(SUMMARY_KEYS) <= set(entry), set(SUMMARY_KEYS) - set(entry)
        assert entry["status"] == "ok" and entry["calls"] == 2 and entry["time_basis"] == "cpu self time"
        assert entry["matmul_time_us_per_call"] > 0 and entry["device_time_us_per_call"] > 0
        assert 0 < entry["matmul_fraction"] < 1 and entry["cast_time_us_per_call"] >= 0
        assert entry["gpu_busy_fraction"] is None and entry["host_syncs_per_call"] is None
        parts = sum(entry[f"{c}_time_us_per_call"] for c in ("matmul", "cast", "elementwise", "reduction",
                                                             "memcpy", "other"))
        assert parts == pytest.approx(entry["device_time_us_per_call"])
        table = pd.read_csv(folder / entry["csv"])
        assert list(table.columns) == list(TOP_COLUMNS) and 0 < len(table) <= 40
        assert MARK not in set(table["name"]) and "matmul" in set(table["category"])
        assert (table["percentage"] >= 0).all() and table["percentage"].sum() <= 100.0 + 1e-6
        assert (folder / entry["trace"]).is_file()
    bf16 = pd.read_csv(folder / "rampde-bf16-mlp-w8-b8-s2.csv")
    assert bf16.loc[bf16["name"] == "aten::addmm", "calls"].iloc[0] > 0  # per forward+backward
    assert json.loads((folder / "environment.json").read_text())["gpu"] == "cpu"
    assert "[2/2] rampde-bf16 mlp w8 b8 N2" in capsys.readouterr().err


def test_a_profile_that_breaks_the_device_is_kept_and_the_rest_are_not_run(tmp_path, monkeypatch):
    def crash(workload, steps):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    fake = Competitor("fake-crash", "bf16", "fake", "-", "rk4-discrete", crash)
    real = kernel_profile.get_competitor
    monkeypatch.setattr(kernel_profile, "get_competitor", lambda name: fake if name == "fake-crash" else real(name))
    monkeypatch.setattr(sweep.measure, "device_fault", lambda device: "CUDA error: an illegal memory access")
    with pytest.raises(sweep.DeviceLost, match=r"after profiling fake-crash on mlp w8 b8 N2 failed.*the 1 profile"):
        run_profiles(["fake-crash", "torchdiffeq-fp32"], [MLP], tmp_path, device="cpu", calls=1, warmup=0)
    entries = json.loads((tmp_path / "profile" / "summary.json").read_text())["profiles"]
    assert {k: v["status"] for k, v in entries.items()} == {"fake-crash-mlp-w8-b8-s2": "error"}


def test_profile_records_out_of_memory(tmp_path, monkeypatch):
    def oom(workload, steps):
        raise torch.OutOfMemoryError("CUDA out of memory")

    fake = Competitor("fake-oom", "bf16", "fake", "-", "rk4-discrete", oom)
    real = kernel_profile.get_competitor
    monkeypatch.setattr(kernel_profile, "get_competitor", lambda name: fake if name == "fake-oom" else real(name))
    summary = run_profiles(["fake-oom", "torchdiffeq-fp32"], [MLP], tmp_path, device="cpu", calls=1, warmup=0)
    entries = summary["profiles"]
    assert entries["fake-oom-mlp-w8-b8-s2"]["status"] == "oom"
    assert entries["torchdiffeq-fp32-mlp-w8-b8-s2"]["status"] == "ok"
    assert not (tmp_path / "profile" / "fake-oom-mlp-w8-b8-s2.csv").exists()


class _Event:
    def __init__(self, name, start, end, *, device=False, id=0, linked=0):
        self.name, self.id, self.linked_correlation_id = name, id, linked
        self.time_range = SimpleNamespace(start=start, end=end)
        self.device_type = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
        self.is_async, self.is_user_annotation, self.self_cpu_time_total, self.kernels = False, False, 0.0, []


class _Kineto:
    """A raw kineto event as torch 2.11 gives it: dtypes and the launching op only here."""

    def __init__(self, event, dtypes):
        self._event, self._dtypes, self._linked = event, dtypes, event.linked_correlation_id

    def device_type(self):
        return self._event.device_type

    def correlation_id(self):
        return self._event.id

    def name(self):
        return self._event.name

    def dtypes(self):
        return self._dtypes

    def linked_correlation_id(self):
        return self._linked


@pytest.mark.parametrize("recorded_on", ["events", "kineto events"])
def test_cuda_summary_from_profiler_events(recorded_on):
    """Two calls: kernels categorised by name and by the op that launched them, launches and syncs
    counted inside the calls only, the GPU busy 70 of 200 us. torch 2.11 keeps which op launched
    a kernel only on the raw kineto events. Host and device ids may coincide, and so may an op's id
    and a runtime call's (the sync here)."""
    events = [
        _Event(MARK, 0, 100), _Event(MARK, 100, 200), _Event(MARK, 0, 200, device=True),
        _Event("aten::addmm", 5, 10, id=1), _Event("aten::copy_", 20, 25, id=2), _Event("aten::tanh", 110, 111, id=3),
        _Event("cudaLaunchKernel", 6, 7, id=11, linked=1), _Event("cudaLaunchKernel", 21, 22, id=12, linked=2),
        _Event("cudaStreamSynchronize", 150, 160, id=2), _Event("cudaDeviceSynchronize", 250, 260, id=14),
        _Event("sm90_xmma_gemm_bf16bf16_bf16f32", 10, 50, device=True, id=11, linked=1),
        _Event("void at::native::unrolled_elementwise_kernel<copy>", 60, 70, device=True, id=12, linked=2),
        _Event("Memcpy DtoH (Device -> Pageable)", 120, 130, device=True, id=3),
        _Event("void at::native::vectorized_elementwise_kernel<4, tanh>", 130, 140, device=True, id=15, linked=3),
    ]
    prof = SimpleNamespace(events=lambda: events)
    if recorded_on == "kineto events":
        raw = [_Kineto(e, ["c10::BFloat16", "float"] if e.name == "aten::copy_" else []) for e in events]
        prof.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: raw))
        for e in events:
            del e.linked_correlation_id
    out = kernel_profile._summarise(prof, 2, True, [(0, 100), (100, 200)])
    assert out["time_basis"] == "cuda kernels"
    assert out["device_time_us_per_call"] == 35
    assert (out["matmul_time_us_per_call"], out["cast_time_us_per_call"], out["memcpy_time_us_per_call"],
            out["elementwise_time_us_per_call"], out["other_time_us_per_call"]) == (20, 5, 5, 5, 0)
    assert out["kernels_per_call"] == 1.5 and out["kernel_launches_per_call"] == 1.0
    assert out["host_syncs_per_call"] == 0.5 and out["host_syncs_by_name"] == {"cudaStreamSynchronize": 0.5}
    assert out["wall_us_per_call"] == 100 and out["gpu_busy_fraction"] == pytest.approx(0.35)
    assert out["matmul_fraction"] == pytest.approx(20 / 35)


@pytest.mark.parametrize("kernel, op, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "aten::mm", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>", "", "matmul"),
    ("sm80_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "aten::cudnn_convolution", "matmul"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "", "cast"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::copy>", "aten::copy_", "cast"),
    ("Memcpy DtoD (Device -> Device)", "aten::copy_", "memcpy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::tanh_kernel_cuda>", "aten::tanh", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "aten::sum", "reduction"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<3>, at::native::(anonymous namespace)::PointwiseOpScalarListFunctor<float, 3, 3, 0>>",
     "aten::_foreach_addcmul_", "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy", "aten::cat", "other"),
])
def test_kernel_categories(kernel, op, category):
    assert categorise_kernel(kernel, op) == category


@pytest.mark.parametrize("op, category", [
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::convolution_backward", "matmul"),
    ("aten::mkldnn_convolution", "matmul"), ("aten::_to_copy", "cast"), ("aten::copy_", "cast"),
    ("aten::tanh_backward", "elementwise"), ("aten::add_", "elementwise"), ("aten::_foreach_add_", "elementwise"),
    ("aten::sum", "reduction"), ("cudaStreamSynchronize", "sync"), ("cudaMemcpy", "sync"),
    ("cudaMemcpyAsync", "other"), ("cudaLaunchKernel", "launch"), ("cuLaunchKernelEx", "launch"),
    ("aten::cat", "other"),
])
def test_op_categories(op, category):
    assert categorise_op(op) == category


@pytest.mark.parametrize("dtypes, category", [
    (["c10::Half", "float", "Scalar"], "cast"), (["float", "c10::BFloat16", "Scalar"], "cast"),
    (["float", "float", "Scalar"], "memcpy"), (["c10::Half", "c10::Half", "Scalar"], "memcpy"),
    ([], "cast"),  # no recorded dtypes: by name
])
def test_a_copy_is_a_cast_only_when_the_dtype_changes(dtypes, category):
    assert categorise_op("aten::copy_", dtypes) == category
    copy_kernel = "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>"
    assert categorise_kernel(copy_kernel, "aten::copy_", dtypes) == category


def _copies_profiled(destination: torch.Tensor, source: torch.Tensor, *, dtypes_on_events: bool = True) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.profiler.record_function(MARK):
            for _ in range(20):
                destination.copy_(source)
    if not dtypes_on_events:  # as torch 2.11 gives them: only on the raw kineto events
        for event in prof.events():
            event.input_dtypes = None
    ranges = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == MARK]
    return kernel_profile._summarise(prof, 1, False, ranges)


@pytest.mark.parametrize("dtypes_on_events", [True, False])
def test_the_summary_tells_a_cast_from_a_copy_on_a_real_profile(dtypes_on_events):
    source = torch.randn(256, 256)
    same = _copies_profiled(torch.empty_like(source), source, dtypes_on_events=dtypes_on_events)
    assert same["memcpy_time_us_per_call"] > 0 and same["cast_time_us_per_call"] == 0
    half = _copies_profiled(torch.empty(256, 256, dtype=torch.float16), source, dtypes_on_events=dtypes_on_events)
    assert half["cast_time_us_per_call"] > 0 and half["memcpy_time_us_per_call"] == 0
