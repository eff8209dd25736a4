"""The benchmark harness: the rig, the receiver, runs, statistics and reports."""
