"""The media behind LUNs (one module per kind), opening them, and their disk threads."""
