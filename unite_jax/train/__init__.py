"""Training: state, step, optimizer, checkpoints, loop."""
