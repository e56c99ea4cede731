"""
swapproxy's benchmark: ``make bench`` (``python -m bench``).

Every figure is measured in one run against a direct connection to the same upstream process, so
that a noisy machine moves both sides alike and the ratios stay comparable. See ``bench/run.py``
for what is measured and README.md ("Benchmark") for the results and how to read them.
"""
