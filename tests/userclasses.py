"""A user class that is not allow-listed for weights_only loading."""


class TrainerState:
    def __init__(self, epoch):
        self.epoch = epoch

    def __eq__(self, other):
        return isinstance(other, TrainerState) and other.epoch == self.epoch


class Exploit:
    """Unpickling this would create a marker file (if unpickling ran code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
