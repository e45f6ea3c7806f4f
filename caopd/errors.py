"""The one exception type for bad user input; the CLI prints it as a one-line error."""


class InputError(Exception):
    """Bad input (a file, a line, a field, an option): the message says where and what."""
