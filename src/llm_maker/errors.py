"""Errors that carry a message meant for the user (the CLI prints it and exits non-zero)."""


class LLMMakerError(Exception):
    """Bad input or state, with a message that names the file, field or value."""


class RecipeError(LLMMakerError):
    """The recipe is invalid: unknown key, wrong type, impossible shape, missing file."""


class DataError(LLMMakerError):
    """A source is empty, unreadable or malformed."""


class CheckpointError(LLMMakerError):
    """A checkpoint is missing, partial or incompatible (other tokenizer, other shape)."""
