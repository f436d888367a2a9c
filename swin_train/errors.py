"""User-facing errors. The CLI layer prints them as one line and exits with `exit_code`."""


class SwinTrainError(Exception):
    """A problem with the user's input (config, data, checkpoint, command line)."""

    exit_code = 2


class ConfigError(SwinTrainError):
    """The configuration (YAML, overrides, architecture) is invalid."""


class DataError(SwinTrainError):
    """The data set is missing, empty, malformed or does not match the model."""


class CheckpointError(SwinTrainError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class TrainingError(SwinTrainError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class ExportError(SwinTrainError):
    """An export cannot be made here (missing packages) or does not reproduce the model."""
