"""The one exception type the library raises for problems a user can fix."""


class BalladError(Exception):
    """A problem with the user's input or environment, phrased as one line that names the file and the fix.

    The CLI prints the message and exits 1 without a traceback; anything else escaping the library is a bug.
    """
