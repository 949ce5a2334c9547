# The one exception type for bad user input: every message names the problem and the fix.


class PptkError(ValueError):
    """A problem with what the user asked for, raised before any process starts where possible.

    The message says what is wrong (with the numbers involved) and how to fix it.
    """
