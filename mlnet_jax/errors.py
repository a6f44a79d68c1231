"""Exceptions whose message is the one line a user sees (the CLIs print it, no traceback)."""


class UserError(Exception):
    """Bad input from the user: a file, a field or an option that is not what was expected."""


class WeightsError(UserError):
    """A weights file that cannot be read or does not fit the model."""
