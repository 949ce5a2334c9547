# Tokenizing batches of text in worker processes that keep the order and leave quietly with their parent.
"""Each worker is ``python -m pptk.data.workers`` with two pipes of its own; the parent hands batches out
round-robin, one in flight per worker, so results come back in order without a queue (and neither side can block
the other: a worker is always idle when it is sent a batch). This replaces ``multiprocessing.Pool`` because:

- a parent killed with ``kill -9`` closes its pipe ends: a worker's next read ends (EOF) or its next write fails
  (broken pipe), at any moment from its start on, and it leaves without a word, where Pool workers printed a
  traceback per pending result and spawn's bootstrap one more for a half-sent start;
- a worker that dies (out of memory, killed) is an error naming it, where a Pool waits for its result forever;
- a worker imports only this module and the tokenizer, not the program that started it (spawn re-imports the
  ``pptk`` command, seconds per worker), and no resource tracker is left to warn about semaphores.

Workers start in a session of their own, so Ctrl-C reaches only the parent, which then closes their pipes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import deque
from collections.abc import Generator, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from pptk.errors import PptkError

Batch = TypeVar("Batch")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding pptk/, for the workers' import path


def backend_tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.no_truncation()
    return backend


def encode(texts: list[str], backend: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts back to back (uint32) and each text's length: the fast tokenizer's batch API."""
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
    return ids, lengths


def _send(pipe: BinaryIO, message: Any) -> None:
    pipe.write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    pipe.flush()


def _serve(inbox: BinaryIO, outbox: BinaryIO) -> None:
    """A worker's life: the tokenizer first, then batches until None; EOF or a broken pipe means the parent is gone."""
    try:
        backend = backend_tokenizer(pickle.load(inbox))
        while (texts := pickle.load(inbox)) is not None:
            try:
                result: Any = (True, encode(texts, backend))
            except Exception as err:  # the parent raises it
                result = (False, f"{type(err).__name__}: {err}")
            _send(outbox, result)
    except (EOFError, pickle.UnpicklingError, OSError):  # a message cut short counts as the parent gone too
        pass
    finally:
        for pipe in (inbox, outbox):
            with suppress(OSError):  # a last flush into the pipe of a parent that is gone
                pipe.close()


class _Worker:
    def __init__(self) -> None:
        worker_inbox, to_worker = os.pipe()
        from_worker, worker_outbox = os.pipe()
        import_path = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(import_path)}
        self.process = subprocess.Popen(  # -P: the working directory's files never shadow pptk's
            [sys.executable, "-P", "-m", "pptk.data.workers", str(worker_inbox), str(worker_outbox)],
            pass_fds=(worker_inbox, worker_outbox),
            env=env,
            start_new_session=True,
        )
        os.close(worker_inbox)  # their ends live in the worker only, so its death reads as EOF here
        os.close(worker_outbox)
        self.inbox = os.fdopen(to_worker, "wb")
        self.outbox = os.fdopen(from_worker, "rb")

    def send(self, message: Any) -> None:
        try:
            _send(self.inbox, message)
        except OSError:  # broken pipe: it died before taking the message
            raise self._died() from None

    def receive(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            ok, result = pickle.load(self.outbox)
        except (EOFError, pickle.UnpicklingError):
            raise self._died() from None
        if not ok:
            raise PptkError(f"the tokenizer failed on a batch of text ({result}); check the input around it")
        return result

    def _died(self) -> PptkError:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return PptkError(
            f"tokenizer worker {self.process.pid} died (exit code {code}; -9 is a kill, often for lack of memory); "
            "prepare again with fewer --workers"
        )

    def stop(self) -> None:
        for pipe in (self.inbox, self.outbox):
            with suppress(OSError):  # a last flush into the pipe of a worker that died
                pipe.close()
        try:
            self.process.wait(timeout=5)  # it leaves at EOF, at the latest after the batch it is tokenizing
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def encode_in_workers(
    batches: Iterable[tuple[Batch, list[str]]], *, tokenizer_json: str, workers: int
) -> Generator[tuple[Batch, np.ndarray, np.ndarray], None, None]:
    """(batch, ids, lengths) for each (batch, texts), in order, tokenized by ``workers`` processes."""
    pool: list[_Worker] = []
    try:
        for _ in range(workers):
            pool.append(_Worker())
        for worker in pool:  # after every start, so the workers import in parallel
            worker.send(tokenizer_json)
        pending: deque = deque()
        for number, (batch, texts) in enumerate(batches):
            if len(pending) == workers:  # the batch read, the worker it goes to must hand back its last one first
                done, worker = pending.popleft()
                yield done, *worker.receive()
            worker = pool[number % workers]
            worker.send(texts)
            pending.append((batch, worker))
        while pending:
            done, worker = pending.popleft()
            yield done, *worker.receive()
        for worker in pool:
            worker.send(None)
    finally:
        for worker in pool:
            worker.stop()


if __name__ == "__main__":
    _serve(os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb"))
