"""
The Resource tree: where requests enter, how the model is chosen, and where bytes are copied.
"""
