"""One thread owns the model: requests queue for it and run one at a time, never mixed.

A request holds a ticket from the moment it is admitted (once its body is in: a client that
stalls while sending holds none, serve/slow_clients.py) until its job ends, so --max-queue bounds
everything waiting for the model, saving uploads and video decoding included; beyond it `admit`
raises `Busy` (a 503). Only a few requests at a time (`ahead`) decode their video
before the model is free for them: each holds a decode slot from then until its job starts, so the
frames waiting in memory stay bounded however long the queue is, while the next videos are still
decoded as the model answers. A job's events (text pieces, then "done" or "error") reach the event
loop through `call_soon_threadsafe`. Cancelling a queued job drops it and frees its places at once;
a running one sees `cancelled()` between tokens (answer.ask polls it).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import Counter
from typing import Callable


class Busy(Exception):
    """The queue is full (code queue_full), or the server is shutting down (shutting_down)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class Once:
    """A place held until release(), which may come from any thread, any number of times."""

    def __init__(self, give_back: Callable[[], None]):
        self._give_back = give_back
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._give_back()


class Job:
    """work(on_text, cancelled) runs in the model thread and returns the result of the "done" event."""

    def __init__(self, work: Callable, ticket: Once, slot: Once | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.work = work
        self.ticket = ticket  # released when the job ends
        self.slot = slot  # released when it leaves the queue
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client went away (or the server is stopping): a queued job will not run at all."""
        with self._lock:
            self._cancelled.set()
            started = self._started
        if not started:
            self._leave_queue()
            self.ticket.release()

    def _start(self) -> bool:
        with self._lock:
            self._started = not self._cancelled.is_set()
        self._leave_queue()
        return self._started

    def _leave_queue(self) -> None:
        if self.slot is not None:
            self.slot.release()

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is listening
            pass


class Worker:
    def __init__(self, max_queue: int, ahead: int = 2):
        self.capacity = max_queue + 1  # the job running plus max_queue waiting
        self._slots = asyncio.Semaphore(ahead)  # bound to the event loop on first use
        # Every key from the start: /health reads it from another thread while the worker counts.
        self.stats: Counter = Counter(answered=0, cancelled=0, dropped=0, failed=0)
        self._lock = threading.Lock()
        self._admitted = 0
        self._closing = False
        self._jobs: queue.Queue = queue.Queue()
        self._running: Job | None = None
        # A daemon thread never holds the process up at exit; stop() still ends it cleanly.
        self._thread = threading.Thread(target=self._loop, name="sharp-model", daemon=True)

    def start(self) -> "Worker":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def waiting(self) -> int:
        """Admitted requests not being answered right now."""
        with self._lock:
            return max(0, self._admitted - (self._running is not None))

    @property
    def busy(self) -> bool:
        return self._running is not None

    def admit(self) -> Once:
        with self._lock:
            if self._closing:
                raise Busy("the server is shutting down", "shutting_down")
            if self._admitted >= self.capacity:
                raise Busy(f"the queue is full ({self.capacity - 1} waiting); try again later", "queue_full")
            self._admitted += 1
            return Once(self._leave)

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def decode_slot(self) -> Once:
        """Wait for one of the `ahead` places of videos decoded before their turn."""
        await self._slots.acquire()
        loop = asyncio.get_running_loop()

        def give_back():
            try:
                loop.call_soon_threadsafe(self._slots.release)
            except RuntimeError:  # the event loop is closed: the server stopped
                pass

        return Once(give_back)

    def submit(self, job: Job) -> None:
        if self._closing:  # admitted before the shutdown began, decoded after it: not answered
            self._drop(job)
            return
        self._jobs.put(job)

    def _drop(self, job: Job) -> None:
        job.cancel()
        self.stats["dropped"] += 1
        job.emit("dropped")

    def drain(self, grace: float) -> None:
        """Shutting down: admit nothing more, drop what is queued, and give the running job `grace`
        seconds before it is cancelled, so that its answer can still finish."""
        with self._lock:
            self._closing = True
        self._drop_queued()
        running = self._running
        if running is not None:
            timer = threading.Timer(grace, running.cancel)
            timer.daemon = True
            timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, then end the thread (waiting at most `timeout` s)."""
        with self._lock:
            self._closing = True
        running = self._running
        if running is not None:
            running.cancel()
        self._drop_queued()
        self._jobs.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _drop_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._drop(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._running = job  # before the start check, so stop() never misses a job that starts
            if not job._start():
                self._running = None
                self.stats["dropped"] += 1
                job.emit("dropped")
                continue
            try:
                result = job.work(lambda piece: job.emit("text", piece), job.cancelled)
            except BaseException as exc:  # noqa: BLE001 - reported to the request, the thread goes on
                self.stats["failed"] += 1
                job.emit("error", exc)
            else:
                self.stats["cancelled" if job.cancelled() else "answered"] += 1
                job.emit("done", result)
            finally:
                self._running = None
                job.ticket.release()
