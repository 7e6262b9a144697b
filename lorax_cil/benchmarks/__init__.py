"""lorax_cil.benchmarks."""
