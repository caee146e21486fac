"""Performance measurement shared by ``speed.py``, ``flops.py`` and ``bench/``: memory probes, timed workloads,
the benchmarked model variants, fvcore FLOP counting with SKA, and the benchmark report rows."""
