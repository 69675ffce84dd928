"""The project's user-facing exception.

A ``BenchError`` is a mistake the user can fix (an unknown name, a missing data directory, a bad
checkpoint). The CLI prints its message as one line and exits with code 2; anything else is a bug and
may show a traceback.
"""


class BenchError(Exception):
    """A user error: printed as one line by the CLI, exit code 2."""
