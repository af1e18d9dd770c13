"""The one exception type that means "the user can fix this".

The CLI prints a `UserError` as a single message (no traceback) and exits with status 2; any
other exception is an internal error and keeps its traceback. Raise it with the file, field or
row at fault and what to do about it.
"""


class UserError(Exception):
    """Bad input: a config key, a file, a row. The message names where and how to fix it."""
