"""Errors that carry a message meant for the user (the CLI prints it and exits non-zero)."""


class LLMMakerError(Exception):
    """Bad input or state, with a message that names the file, field or value."""


class RecipeError(LLMMakerError):
    """The recipe is invalid: unknown key, wrong type, impossible shape, missing file."""


class DataError(LLMMakerError):
    """A source is empty, unreadable or malformed."""


class CheckpointError(LLMMakerError):
    """A checkpoint is missing, partial or incompatible (other tokenizer, other shape)."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint or model directory cannot be read: missing, empty, truncated or corrupt."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class TrainingError(LLMMakerError):
    """Training went wrong in a way the loop cannot recover from (it kept diverging)."""
