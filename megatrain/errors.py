"""The errors a user can fix. Only these become one line and exit 2 at a launcher; any other exception is a bug
and keeps its traceback.

Each derives from ``ValueError`` so that callers (and pydantic validators) that catch ``ValueError`` still do."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message is one actionable line naming the field or file and the fix."""


class ConfigError(UserError):
    """A user error in a config file, an override or the layout it implies."""


class DataError(UserError):
    """A data file or prepared data directory that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint, saved model or Hugging Face directory that cannot be loaded; names the file (and tensor)."""
