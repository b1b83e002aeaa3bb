"""Benchmarks: kernels against their anchors (``kernels``) and whole-model training steps
(``models``), each in one process, results as JSON + PNG + a Markdown table."""

from .kernels import KERNELS, KernelBenchConfig, format_bench_table, plot_bench, run_kernel_bench

__all__ = ["KERNELS", "KernelBenchConfig", "format_bench_table", "plot_bench", "run_kernel_bench"]
