"""One error type for user mistakes; the CLI maps it to exit status 2."""


class DistreeError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do.

    Raised for bad files, unknown devices, infeasible constraints, wrong shapes. The CLI prints
    ``error: <message>`` on one line and exits with status 2 (traceback only with ``--debug``).
    """

    exit_code = 2
