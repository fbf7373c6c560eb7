"""The one family of errors a user fixes: bad input, refused as one clear message and exit 2.

``ConfigError`` (a study file), ``DataError`` (data on disk) and ``StudyError`` (a study that cannot
start or resume as asked) all derive from ``UsageError``, so the command line catches them without
importing the modules that raise them (and torch, optuna or mlflow with them).
"""


class UsageError(Exception):
    """Input that cannot be run as given; the message says where and how to fix it."""
