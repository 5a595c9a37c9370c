"""TFDS -> tf.data -> per-host batches; the offline Fashion-MNIST preparation."""
