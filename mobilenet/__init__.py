"""mobilenet: a JAX/Flax research codebase for depthwise-separable convolutions (the MobileNet family)."""
from mobilenet import third_party_logs

third_party_logs.apply()  # Before JAX and TensorFlow are imported (see its docstring).
