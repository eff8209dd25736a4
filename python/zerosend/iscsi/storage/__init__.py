"""The target's storage layer."""
