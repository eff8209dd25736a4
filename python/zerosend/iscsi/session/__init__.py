"""The target's session layer."""
