"""The one base class of *expected* failures.

An expected failure is one the user can fix: a bad config value, an unreadable data file, a model that is
not where the config says, an accelerator that is not there. Its message names what is wrong, where, and
what is allowed; the command line prints it on one line and exits with status 2. Any other exception is
unexpected: the command line keeps its traceback in a log file and exits with status 1.

This module sits at the bottom of the import layering: it imports nothing from backdoorbench.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure the user can fix; the message says what, where and what is allowed."""


class DataError(UserError, ValueError):
    """A data file or dataset that cannot be used (unreadable, wrong format, labels out of range, ...)."""


class ModelError(UserError, ValueError):
    """A model that cannot be loaded or used as configured (no such path, empty folder, too few positions)."""
