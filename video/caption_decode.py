"""Decoding videos for ``vtr caption``: one video -> :class:`Decoded`, and a crash-proof process pool.

Decoding runs in separate processes (``spawn``), not threads, for two reasons: it runs in parallel with
generation without competing for the GIL, and a decoder that crashes on a broken file (a segfault inside
FFmpeg) or hangs takes down only its worker. The pool records such a video as an error, starts a new worker
and goes on, so one bad file never stops a batch nor makes every rerun crash at the same place.
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["DecodePool", "Decoded", "decode_one", "make_decode_task"]


@dataclass
class Decoded:
    """One video after decoding: a clip (``vtr.video.io.Clip``) or the error that stopped it.

    ``error`` is ``"<ExceptionType>: <message>"`` (exceptions are flattened to text so they cross process
    boundaries whatever their constructor); ``seconds`` is the wall time of reading the file.
    """

    path: str
    clip: Any | None
    error: str | None
    seconds: float


def decode_one(
    path: str,
    *,
    reader: Callable[..., Any],
    read_kwargs: dict[str, Any],
    max_duration: float | None = None,
) -> Decoded:
    """Read ``path`` with ``reader(path, **read_kwargs)``; any exception becomes ``Decoded.error``.

    ``max_duration`` (seconds): a longer video is an error ("too long"), so one huge file cannot stall a batch.
    """
    t0 = time.perf_counter()
    try:
        clip = reader(path, **read_kwargs)
        if max_duration is not None and clip.duration > max_duration:
            raise ValueError(f"video too long: {clip.duration:.1f} s > max_duration {max_duration:g} s: {path}")
    except Exception as exc:  # one bad video must not stop the batch: record what went wrong
        return Decoded(path, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    return Decoded(path, clip, None, time.perf_counter() - t0)


def make_decode_task(
    reader: Callable[..., Any], read_kwargs: dict[str, Any], max_duration: float | None
) -> Callable[[str], Decoded]:
    """A picklable ``path -> Decoded`` (``reader`` must be a module-level function to reach worker processes)."""
    return functools.partial(decode_one, reader=reader, read_kwargs=dict(read_kwargs), max_duration=max_duration)


def _worker_main(conn: Connection, task: Callable[[str], Decoded]) -> None:
    """Worker process: receive a path, send back its :class:`Decoded`; ``None`` or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    conn.send(_READY)
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):
            return
        if path is None:
            return
        result = task(path)
        try:
            conn.send(result)
        except Exception as exc:  # e.g. a reader returning something unpicklable
            conn.send(Decoded(path, None, f"{type(exc).__name__}: cannot return the decoded clip: {exc}", 0.0))


class _Worker:
    def __init__(self, ctx: Any, task: Callable[[str], Decoded]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, task), daemon=True, name="vtr-decode")
        self.process.start()
        child.close()
        self.path: str | None = None  # the video it is decoding
        self.started = 0.0

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the worker has started; a worker that dies first is a setup failure, not a video's."""
        if self.conn.poll(timeout):
            try:
                if self.conn.recv() == _READY:
                    return
            except (EOFError, OSError):
                pass
        self.process.join(1.0)
        raise RuntimeError(
            f"a decode worker process failed to start (exit code {self.process.exitcode}). If you call "
            "caption_videos from a script, put the call under `if __name__ == '__main__':` (worker processes are "
            "spawned and import the main module)"
        )

    def submit(self, path: str) -> None:
        self.path, self.started = path, time.perf_counter()
        self.conn.send(path)

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()


_END = object()
_READY = "ready"


class DecodePool:
    """Decode videos in ``workers`` processes; :meth:`imap` yields :class:`Decoded` as they finish.

    At most ``prefetch`` decoded clips wait for the consumer (bounded memory; decoding pauses when the
    consumer falls behind). A worker that dies or exceeds ``timeout`` seconds on one video yields an error
    for that video and is replaced. ``workers=0`` decodes in the calling thread (no overlap; for debugging).
    """

    def __init__(
        self,
        task: Callable[[str], Decoded],
        *,
        workers: int,
        prefetch: int,
        timeout: float | None = None,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.task, self.workers, self.prefetch, self.timeout = task, workers, prefetch, timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._out: queue.Queue = queue.Queue(maxsize=prefetch)
        self._thread: threading.Thread | None = None
        self.replaced = 0  # workers restarted after a crash or a timeout

    def imap(self, paths: Iterable[str]) -> Iterator[Decoded]:
        """Start decoding every path (once) now; the iterator yields results in completion order.

        The workers start at this call, not at the first ``next``, so they warm up while the caller does
        other work (loading the model). Close the pool (or use ``with``) when done.
        """
        if self.workers == 0:
            return (self.task(path) for path in paths)
        if self._thread is not None:
            raise RuntimeError("DecodePool.imap can only be called once per pool")
        self._thread = threading.Thread(target=self._dispatch, args=(iter(paths),), daemon=True, name="vtr-decode")
        self._thread.start()
        return self._results()

    def _results(self) -> Iterator[Decoded]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise RuntimeError("the decode dispatcher failed") from item
            yield item

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _dispatch(self, paths: Iterator[str]) -> None:
        pool: list[_Worker] = []
        try:
            pool = [_Worker(self._ctx, self.task) for _ in range(self.workers)]
            for w in pool:
                w.wait_ready()
            exhausted = False
            while not self._stop.is_set():
                for i, w in enumerate(pool):
                    if w.path is None and not exhausted:
                        if not w.process.is_alive():
                            w.stop(0)
                            pool[i] = w = self._new_worker()
                        path = next(paths, None)
                        if path is None:
                            exhausted = True
                        else:
                            w.submit(path)
                busy = [w for w in pool if w.path is not None]
                if not busy:
                    if exhausted:
                        break
                    continue
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
                now = time.perf_counter()
                for i, w in enumerate(pool):
                    if w.path is None:
                        continue
                    collected = self._collect(w, ready, now)
                    if collected is None:
                        continue
                    result, lost_worker = collected
                    w.path = None
                    if lost_worker:
                        w.stop(0)
                        pool[i] = self._new_worker()
                        self.replaced += 1
                    self._put(result)
        except BaseException as exc:  # surface dispatcher bugs in the consumer instead of hanging it
            self._put(exc)
        finally:
            for w in pool:
                w.stop()
            self._put(_END)

    def _new_worker(self) -> _Worker:
        w = _Worker(self._ctx, self.task)
        w.wait_ready()
        return w

    def _collect(self, w: _Worker, ready: list, now: float) -> tuple[Decoded, bool] | None:
        """``(result, worker lost)`` once the worker's video is settled, ``None`` while it is still decoding.

        The result is the worker's own, or an error when the worker died (crash) or ran past the timeout
        (then it is killed); in those two cases the worker is lost and must be replaced.
        """
        assert w.path is not None
        if w.conn in ready or w.conn.poll():
            try:
                return w.conn.recv(), False
            except (EOFError, OSError):
                pass  # the pipe closed without a result: the worker died
        elif w.process.is_alive():
            if self.timeout is not None and now - w.started > self.timeout:
                w.process.kill()
                error = f"DecodeTimeout: decoding took over {self.timeout:g} s: {w.path}"
                return Decoded(w.path, None, error, now - w.started), True
            return None
        w.process.join(1.0)
        code = w.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        error = f"DecoderCrash: the decoder process died ({how}) on {w.path}"
        return Decoded(w.path, None, error, now - w.started), True

    def close(self) -> None:
        """Stop the workers and the dispatcher (idempotent); pending videos are abandoned, not recorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
