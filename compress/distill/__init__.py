"""Teacher→student distillation: the ``distill`` pass and its training loop."""
