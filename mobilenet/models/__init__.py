"""The networks: block tables, the Flax blocks, one builder, counting and weight conversion."""
