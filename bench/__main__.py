"""
``python -m bench``: run the benchmark once, print the table, save the JSON.
"""

from bench.run import main

raise SystemExit(main())
