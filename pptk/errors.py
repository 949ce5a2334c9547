# The one exception type for bad user input: every message names the problem and the fix.


class PptkError(ValueError):
    """A problem with what the user asked for, raised before any process starts where possible.

    The message says what is wrong (with the numbers involved) and how to fix it.
    """


def run_main(main, *, program: str) -> int:
    """Run a recipe's or command's ``main()``: a PptkError becomes one line on stderr and exit code 2."""
    import sys

    try:
        return main()
    except PptkError as err:
        print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        return 2
