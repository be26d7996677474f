"""The rampde benchmark library (needs the ``[bench]`` extra).

competitors: who is measured; workloads: on what; measure: how (timing, memory, gradient error),
with nvml (the sampler), environment (GPU, versions, commit) and gpu_peaks (datasheet peaks);
sweep: over which grid; suites: the named grids; results: the tidy table and the claims;
targets: the performance targets; report: the dashboard; training (training_recipes,
training_report, training_cli): training parity; profiling (ablation, kernel_profile,
gemm_probe): where the time goes; cli: ``rampde-bench``.
"""
