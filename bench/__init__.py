"""Benchmarks of zerosend against the senders users would otherwise pick (``python -m bench``).

By role: ``harness/`` (the rig, the receiver, runs, statistics, reports and the command line),
``senders/`` (the contenders and the focused cost studies), ``iscsi/`` (the iSCSI target against
tgtd: method, script and its results), ``demo/`` (``make run``), ``results/`` (the core
benchmark's data, plots and notes).
"""
