"""mobilenet: a JAX/Flax research codebase for depthwise-separable convolutions (MobileNetV1)."""
