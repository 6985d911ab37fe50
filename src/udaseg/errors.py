"""The one exception type for mistakes a user can fix (bad paths, bad configs, bad files).

The CLI prints a ``UserError`` as a single line and exits with status 2, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file, a config key or value."""
