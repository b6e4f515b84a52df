"""The library's one exception type (re-exported by `core`, where Megatron-Core defines it)."""


class CheckpointingException(Exception):
    """Base checkpointing related exception."""
