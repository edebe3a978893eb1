"""The project's error types: each one carries a message a user can act on."""


class StreamMergeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class PlanError(StreamMergeError):
    """The plan (YAML or dict) is invalid: the message names the key, the value and what is valid."""


class CheckpointError(StreamMergeError):
    """An input checkpoint is missing, malformed or incompatible: the message names the file and tensor."""


class OutputError(StreamMergeError):
    """The output location cannot be written as asked."""


class MissingExtraError(StreamMergeError):
    """An optional package is needed: the message names the extra to install."""


class DataError(StreamMergeError):
    """Evaluation or calibration data is missing, empty or unreadable: the message names the source
    and the fix."""
