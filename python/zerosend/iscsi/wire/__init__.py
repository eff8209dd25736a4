"""The target's wire layer."""
