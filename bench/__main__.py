"""
``python -m bench``: run the benchmark once, print the table, save the JSON; then the swap storm.
"""

from bench.run import main
from bench.swapstorm import main as swap_storm

raise SystemExit(main() or swap_storm([]))
