"""Training: pure steps, lanes and their mesh, checkpoints, and the trainer."""
