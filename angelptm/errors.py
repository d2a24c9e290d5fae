"""The one exception type for bad user input.

Anything a user can fix (a config key, a path, a layout, a checkpoint) raises `UserError` with a
single line that names the problem and the fix. The CLI prints that line, exits with status 2 and
shows no traceback; library callers can catch it like any other exception.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the field and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, value or combination of values that cannot work."""
