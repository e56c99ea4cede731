"""
swapproxy: one stable OpenAI-compatible endpoint that starts, swaps and stops local model servers.
"""

__version__ = "0.1.0"
