"""Config schema, optimizers, the train state and steps, the loop, checkpoints, metrics, the mesh."""
