"""From a failure to the `deepspeed` launcher's exit: how long a failing job takes to end, on CPU ranks.

Three failures of a 2-rank GPT demo run (`recipes/gpt_pretrain.py` under DeepSpeed's own launcher), each timed from
the moment it happens to the moment the launcher exits, with what the user sees:
- an error on one rank after the process group formed (rank 0's weights turn NaN before the step-4 save, which it
  refuses: the failpoint `nan:0:4`), timed from its error line;
- SIGKILL of rank 1 during training (as the OOM killer does), timed from the kill; pptk's line must name rank 1;
- SIGTERM to the launcher (a batch scheduler), timed until no rank is left.
Target: under 30 s each. Writes benchmarks/results/failure_exit.json.

    make install && .venv/bin/python benchmarks/failure_exit.py
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_file import ROOT, write_result

TARGET_S = 30.0
VENV_BIN = Path(sys.executable).parent
QUICK = ["--demo", "--log-every", "1", "--eval-every", "1000", "--wandb-mode", "disabled", "--micro-batch-size", "2"]


def _launch(out: Path, cache: Path, extra: list[str], env: dict) -> tuple[subprocess.Popen, queue.Queue]:
    """The runner, and a queue of (arrival time, line) of its merged output, read as it comes."""
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(ROOT / "recipes" / "gpt_pretrain.py"), "--output-dir", str(out), "--data-cache", str(cache),
           *QUICK, *extra]  # fmt: skip
    runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in runner.stdout:  # type: ignore[union-attr]
            lines.put((time.monotonic(), line.rstrip()))

    threading.Thread(target=read, daemon=True).start()
    return runner, lines


def _drain(lines: queue.Queue) -> list[tuple[float, str]]:
    got = []
    while not lines.empty():
        got.append(lines.get())
    return got


def _rank_pids(out: Path) -> dict[int, int]:
    pids = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmdline:
                for arg in cmdline:
                    if arg.startswith(b"--local_rank="):
                        pids[int(arg.split(b"=")[1])] = int(proc.name)
    return pids


def _wait_for_training(out: Path, runner: subprocess.Popen, steps: int = 2) -> None:
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        if runner.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run did not start training (exit code {runner.returncode})")
        time.sleep(0.2)


def error_after_process_group(work: Path, cache: Path, env: dict) -> dict:
    runner, lines = _launch(work / "error", cache, ["--max-steps", "8", "--save-every", "2"],
                            dict(env, PPTK_FAILPOINT="nan:0:4"))  # fmt: skip
    code = runner.wait(timeout=600)
    ended = time.monotonic()
    time.sleep(0.5)  # the reader thread's last lines
    output = _drain(lines)
    failed = [(t, line) for t, line in output if "gpt_pretrain: error:" in line]
    if not failed:
        raise RuntimeError("no error line:\n" + "\n".join(line for _, line in output[-30:]))
    said = [line for _, line in output if "gpt_pretrain: error:" in line or "stopping" in line]
    return {"what": "an error on rank 0 after the process group formed (NaN weights refused at a save)",
            "from": "the error line", "seconds": round(ended - failed[0][0], 2), "exit_code": code,
            "exit_code_is_the_failed_ranks": code == 2, "lines": said}  # fmt: skip


def sigkill_one_rank(work: Path, cache: Path, env: dict) -> dict:
    out = work / "sigkill"
    runner, lines = _launch(out, cache, ["--max-steps", "400"], env)
    _wait_for_training(out, runner)
    killed = time.monotonic()
    os.kill(_rank_pids(out)[1], signal.SIGKILL)
    code = runner.wait(timeout=600)
    ended = time.monotonic()
    time.sleep(0.5)
    said = [line for _, line in _drain(lines) if "stopping" in line]
    return {"what": "SIGKILL of rank 1 during training", "from": "the kill", "seconds": round(ended - killed, 2),
            "exit_code": code, "names_the_dead_rank": any("stopping: rank 1 failed" in line for line in said),
            "lines": said}  # fmt: skip


def sigterm_the_launcher(work: Path, cache: Path, env: dict) -> dict:
    out = work / "sigterm"
    runner, lines = _launch(out, cache, ["--max-steps", "400"], env)
    _wait_for_training(out, runner)
    signalled = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    while _rank_pids(out) and time.monotonic() - signalled < 120:
        time.sleep(0.1)
    ended = time.monotonic()
    time.sleep(0.5)
    said = [line for _, line in _drain(lines) if "launcher is gone" in line]
    return {"what": "SIGTERM to the deepspeed launcher", "from": "the signal", "until": "no rank is left",
            "seconds": round(ended - signalled, 2), "ranks_left": len(_rank_pids(out)), "lines": said}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "failure_exit.json")
    args = p.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), Path(tmp) / "demo-cache"
        cases = [case(work, cache, env) for case in (error_after_process_group, sigkill_one_rank, sigterm_the_launcher)]
        for case in cases:
            case["lines"] = [line.replace(tmp, "<tmp>") for line in case["lines"]]
            case["within_target"] = case["seconds"] < TARGET_S
            print(f"{case['seconds']:6.2f} s  {case['what']}")
    write_result(args.output, {"target_s": TARGET_S, "launcher": "deepspeed (DeepSpeed's runner and launch)",
                               "ranks": 2, "cases": cases})  # fmt: skip


if __name__ == "__main__":
    main()
