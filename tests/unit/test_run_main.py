# How a launched rank leaves through launch.entry.run_main: at once (os._exit, no interpreter teardown), with its output
# flushed and its exit code kept, after a success as after an error; a single process exits as Python does.
import os
import subprocess
import sys
import textwrap

RANK = textwrap.dedent(
    """
    import atexit, sys
    from pptk.errors import PptkError
    from pptk.launch.entry import run_main

    def main():
        atexit.register(print, "interpreter teardown ran")
        print("trained", end="")  # no newline, no flush: run_main must flush it
        if sys.argv[1] == "error":
            raise PptkError("bad input")
        return 0

    sys.exit(run_main(main, program="rank"))
    """
)


def _run(outcome: str, world_size: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": world_size, "RANK": "1"}
    return subprocess.run([sys.executable, "-c", RANK, outcome], env=env, capture_output=True, text=True, timeout=60)


def test_a_launched_rank_leaves_at_once_with_its_output_and_code():
    done, failed = _run("ok", "2"), _run("error", "2")
    assert (done.returncode, done.stdout) == (0, "trained")  # flushed; the atexit handler never ran
    assert (failed.returncode, failed.stdout) == (2, "trained")
    assert failed.stderr.strip() == "rank: error: rank 1: bad input"


def test_a_single_process_exits_as_python_does():
    """The check above can fail: without a launch, run_main returns and the interpreter tears down as usual."""
    done = _run("ok", "1")
    assert (done.returncode, done.stdout) == (0, "trainedinterpreter teardown ran\n")
