"""The operations a model is built with: plain Flax/XLA, or faster swap-ins computing the same function."""
