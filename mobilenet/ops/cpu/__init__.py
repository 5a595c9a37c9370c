"""C++ kernels for XLA:CPU (built on first use, registered through jax.ffi)."""
