"""User-facing errors: the CLI prints their message on one line and exits with status 2.

Anything the user can fix (a bad file, a bad flag, a mismatched score file) raises a subclass of
:class:`UserError`; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """An error caused by the user's input; its message is one line that says what to fix.

    A ``ValueError``, so library callers can catch it as one. Library code names Python
    arguments (``damping=``); the command line translates those to its flags."""


class DataError(UserError):
    """A dataset file is missing or malformed; the message names the file and line."""


class ScoreFileError(UserError):
    """A score file is missing, malformed, or belongs to another dataset or kind."""
