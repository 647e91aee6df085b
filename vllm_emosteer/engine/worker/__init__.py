"""The worker processes: the per-step steering runtime, the hooks and the op in the model, capture mode, and the
collective RPCs the front-end calls."""
