# A rank stopped by SIGTERM unwinds: what it holds in `finally` is released. The case that hung CI: torch's build
# lock of a JIT-built DeepSpeed op, held while ninja runs, left behind by a rank killed inside it.
import signal
import subprocess
import sys
import textwrap

RANK = textwrap.dedent(
    """
    import subprocess, sys
    from torch.utils.file_baton import FileBaton
    from pptk.errors import run_main
    from pptk.launch_watch import exit_on_sigterm

    def main():
        baton = FileBaton(sys.argv[1])
        assert baton.try_acquire()
        try:  # as torch.utils.cpp_extension._jit_compile holds it around the build
            print("building", flush=True)
            subprocess.run(["sleep", "20"])
        finally:
            baton.release()
        return 0

    exit_on_sigterm()
    sys.exit(run_main(main, program="rank"))
    """
)


def test_sigterm_inside_a_build_releases_torchs_build_lock(tmp_path):
    lock = tmp_path / "lock"
    rank = subprocess.Popen([sys.executable, "-c", RANK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "building" and lock.exists()
    rank.send_signal(signal.SIGTERM)
    assert rank.wait(timeout=30) == 128 + signal.SIGTERM
    assert not lock.exists(), "the lock outlived the rank: every later start would wait on it"


def test_without_the_handler_the_lock_stays(tmp_path):
    """The check above can fail: a plain SIGTERM leaves the lock (what DeepSpeed's launcher did to a sibling rank)."""
    lock = tmp_path / "lock"
    plain = RANK.replace("exit_on_sigterm()\n", "")
    rank = subprocess.Popen([sys.executable, "-c", plain, str(lock)], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "building"
    rank.send_signal(signal.SIGTERM)
    assert rank.wait(timeout=30) == -signal.SIGTERM
    assert lock.exists()
