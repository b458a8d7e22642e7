"""The one exception type that the command line turns into a one-line message."""


class LrquantError(Exception):
    """A problem with the user's input or environment: what is wrong and what to do.

    The command line prints ``error: <message>`` and exits non-zero, without a traceback.
    """
