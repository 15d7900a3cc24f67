"""Tools around the detector: weight conversion, export, prediction, benchmarks, parity, probes."""
