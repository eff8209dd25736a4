"""The target as a service: listening, settings, reload, metrics, control, command line."""
