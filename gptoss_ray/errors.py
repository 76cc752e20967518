"""Errors a user can cause and fix. The CLI prints them as one line; the server maps
them to OpenAI's error envelope. Anything else is a bug and keeps its traceback."""


class GptOssError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(GptOssError, ValueError):
    """A config.json or user configuration value is missing or invalid."""


class CheckpointError(GptOssError):
    """A checkpoint cannot be found, downloaded or read."""


class SamplingParamsError(GptOssError, ValueError):
    """A sampling parameter is out of range. `param` names it (OpenAI's error field);
    `code` is OpenAI's error code where it has one (context_length_exceeded)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
