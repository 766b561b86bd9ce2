"""Errors a user can fix; the command line prints each as one red line, without a traceback."""


class ReidkitError(Exception):
    """Base class: the message names the file or option at fault and how to fix it."""


class ConfigError(ReidkitError):
    """A preset, a `--set` override or a model option is invalid."""


class DatasetError(ReidkitError):
    """A dataset source, layout, manifest or image is missing or wrong."""


class CheckpointError(ReidkitError):
    """A checkpoint or weight file is missing, unreadable or of the wrong kind."""


class IndexFolderError(ReidkitError):
    """A gallery index folder is missing, incomplete or inconsistent."""


class NumericalError(ReidkitError):
    """A model's computation failed in floating point, e.g. a singular CSALR landmark matrix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command; the message says what was kept, what was cleaned up and the
    command that continues. A KeyboardInterrupt still, so callers that handle one still do."""
