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
    from pptk.launch.entry import run_main
    from pptk.launch.watch import exit_on_sigterm

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


def test_a_sibling_killed_without_a_word_is_named_by_its_rank():
    """This process plays DeepSpeed's launch: the ranks it started are found by their RANK, and one SIGKILLed is
    dead both before it is reaped (a zombie) and after."""
    import os

    from pptk.launch import watch as launch_watch

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ranks = {rank: subprocess.Popen(sleep, env={**os.environ, "RANK": str(rank)}) for rank in (3, 4)}
    try:
        found = launch_watch._started_by(os.getpid())
        assert {r: found.get(r) for r in ranks} == {r: p.pid for r, p in ranks.items()}
        launch_watch._SIBLINGS.update({r: p.pid for r, p in ranks.items()})
        assert launch_watch.dead_ranks() == []
        ranks[4].send_signal(signal.SIGKILL)
        assert launch_watch.dead_ranks(wait_s=5) == [4]  # a zombie: killed, not yet reaped
        ranks[4].wait()
        assert launch_watch.dead_ranks() == [4]
    finally:
        launch_watch._SIBLINGS.clear()
        for proc in ranks.values():
            proc.kill()
            proc.wait()
