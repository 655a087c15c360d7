"""Tools around the pipeline: benchmarks, the run comparison, recipes."""
