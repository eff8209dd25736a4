"""Benchmarks of zerosend against the senders users would otherwise pick (``python -m bench``)."""
