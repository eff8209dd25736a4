"""``make run``: the demo that probes the kernel and pushes 1 GiB through each backend."""
