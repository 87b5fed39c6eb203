"""The model thread of `sharp serve --max-batch N` (N > 1): requests are answered together.

Admission, the bounded queue, videos decoded ahead of their turn, dropping queued requests and the
events a request sees are the one-at-a-time Worker's (worker.py). What differs is the loop: it
hands each job to a scheduler (sharp_cli/scheduler.py) as soon as the scheduler could start it, and
between jobs runs decode steps, so up to N answers are in flight and each streams as it is decoded.
A job leaves the queue (and gives its decode-ahead place back) when the scheduler takes it;
cancelling a running job ends its answer at the next token, the others go on.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from sharp_cli.scheduler import Cancelled, Done
from sharp_cli.serve.worker import Job, Worker


class BatchWorker(Worker):
    def __init__(self, max_queue: int, ahead: int, make_scheduler: Callable, max_batch: int):
        super().__init__(max_queue, ahead=ahead)
        self.capacity = max_queue + max_batch  # every answer in flight, plus max_queue waiting
        self._make_scheduler = make_scheduler  # called in the model thread
        self._in_flight: dict = {}  # id(scheduler request) -> (request, job)

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._admitted - len(self._in_flight))

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    @property
    def running(self) -> int:
        return len(self._in_flight)

    def drain(self, grace: float) -> None:
        with self._lock:
            self._closing = True
        self._drop_queued()
        jobs = [job for _, job in list(self._in_flight.values())]  # a snapshot: the model thread changes it
        if jobs:
            timer = threading.Timer(grace, lambda: [job.cancel() for job in jobs])
            timer.daemon = True
            timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
        for _, job in list(self._in_flight.values()):
            job.cancel()
        self._drop_queued()
        self._jobs.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        scheduler = self._make_scheduler()
        stopping = False
        while not (stopping and scheduler.idle):
            if not stopping and scheduler.wants_more():
                try:
                    job = self._jobs.get(block=scheduler.idle)
                except queue.Empty:
                    job = ...
                if job is None:
                    stopping = True
                elif job is not ...:
                    self._take(scheduler, job)
            try:
                done = scheduler.advance()
            except Exception as exc:  # noqa: BLE001 - the scheduler itself broke: fail what it held, start over
                done = [Done(request, error=exc) for request, _ in list(self._in_flight.values())]
                scheduler = self._make_scheduler()
            for item in done:
                self._end(item)

    def _take(self, scheduler, job: Job) -> None:
        if not job._start():
            self.stats["dropped"] += 1
            job.emit("dropped")
            return
        request = job.work.request(lambda piece: job.emit("text", piece), job.cancelled)
        self._in_flight[id(request)] = (request, job)
        scheduler.submit(request)

    def _end(self, done) -> None:
        _, job = self._in_flight.pop(id(done.request), (None, None))
        if job is None:
            return
        try:
            if done.error is not None:
                if isinstance(done.error, Cancelled):
                    self.stats["cancelled"] += 1
                    job.emit("dropped")
                else:
                    self.stats["failed"] += 1
                    job.emit("error", job.work.failure(done.error))
            else:
                result = job.work.result(done.answer)
                self.stats["cancelled" if job.cancelled() else "answered"] += 1
                job.emit("done", result)
        except BaseException as exc:  # noqa: BLE001 - reported to the request, the thread goes on
            self.stats["failed"] += 1
            job.emit("error", exc)
        finally:
            job.ticket.release()
