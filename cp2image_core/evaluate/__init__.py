"""Evaluation: re-measure synthesized cells with CellProfiler, pixel metrics, realism, baselines."""
