"""What sends in the benchmarks: the contenders (Python, Rust, C), the stream and syscall
measurements, and the cost studies of the Python path and the loop bridge."""
