"""What train.py composes (import from the submodules): flags and recipes, data, model set-up, the loop, checkpoints,
run lock, user errors, evaluation and metrics."""
