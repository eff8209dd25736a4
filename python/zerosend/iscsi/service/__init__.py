"""The target's service layer."""
