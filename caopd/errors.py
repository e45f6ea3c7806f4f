"""The exceptions the CLI prints as one line: bad user input, and a run that stopped and can resume."""


class InputError(Exception):
    """Bad input (a file, a line, a field, an option): the message says where and what."""


class StoppedRun(Exception):
    """A run stopped by a failure outside it (a rollout server that went away): the message says why,
    at which step, and which checkpoint ``--resume`` continues from."""


class Interrupted(StoppedRun):
    """A run stopped by Ctrl-C (SIGINT): exit code 130, as a shell reports an interrupted command."""
