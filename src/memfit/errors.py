"""Errors a user can cause. Each message says what to change; the CLI prints it without a traceback."""


class MemfitError(Exception):
    """Base class for every error caused by user input (recipe, files, data, budget)."""


class ConfigError(MemfitError):
    """A recipe or technique configuration is invalid."""


class DataError(MemfitError):
    """A data file is missing, empty, or has the wrong columns or labels."""


class ModelError(MemfitError):
    """A model cannot be found, loaded or built."""


class BudgetError(MemfitError):
    """No plan fits the memory budget."""


class CheckpointError(MemfitError):
    """A checkpoint is missing, incomplete or does not match the run."""


class CompatError(MemfitError):
    """An installed library (torch, transformers, peft, ...) does not behave as memfit expects: a hook found nothing
    to act on. The message names the versions installed and the range memfit is tested with."""


class RunDirError(MemfitError):
    """A run directory cannot be created or written, is not a memfit run, or holds a damaged file."""
