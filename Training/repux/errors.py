"""The one exception family the command line reports as a plain message instead of a traceback."""


class InputError(ValueError):
    """Bad input from the user: a file, value or option that cannot be used.

    The message names the file (or option), the offending value and what was expected.
    """
