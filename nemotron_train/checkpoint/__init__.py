from nemotron_train.checkpoint.manager import CheckpointError, Checkpointer, read_tracker

__all__ = ["Checkpointer", "CheckpointError", "read_tracker"]
