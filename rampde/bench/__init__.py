"""The rampde benchmark library (needs the ``[bench]`` extra).

competitors: who is measured; workloads: on what; measure: how; sweep: over which grid;
results: the tidy table and the claims; report: the dashboard; cli: ``rampde-bench``.
"""
