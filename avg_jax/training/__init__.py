"""Training: the sharded, checkpointed loop (trainer.py) and the retrieval losses and tasks."""
