"""Exceptions for a user's mistakes (bad config, bad data, missing files).

Library code raises these; the command lines (:mod:`asff_jax.cli`) turn them into
one line on stderr and a non-zero exit status, with no Python traceback
(``--verbose`` shows it). Everything else is a bug and keeps its traceback.

All derive from :class:`UserError`, which derives from ``ValueError`` so that
callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
  """A problem with what the user gave us; the message says what and where (one line)."""


class ConfigError(UserError):
  """An invalid config value or combination (the message names the key and a valid value)."""


class DataError(UserError):
  """A dataset, image or annotation file that cannot be used (the message names the file)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user pointed at does not exist (workdir, checkpoint, config, dataset)."""
