"""The exceptions a command turns into one line on stderr and an exit code."""

from __future__ import annotations


class DsfuseError(Exception):
    """A failure the user can act on; `where` names the file or option at fault."""

    exit_code = 1

    def __init__(self, what: str, where: object | None = None):
        super().__init__(what)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where is not None else self.what


class UsageError(DsfuseError):
    """Bad option or unusable input: exit code 2."""

    exit_code = 2


class InputError(DsfuseError):
    """One input (file) could not be processed: exit code 1, the others go on."""

    exit_code = 1


class ConfigError(ValueError):
    """A model config refusing a value; `field` names the field at fault, so a task can name its option."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

    def as_usage_error(self) -> UsageError:
        """The refusal as a command reports it: naming the option spelled like the field."""
        return UsageError(str(self), "--" + self.field.replace("_", "-"))
