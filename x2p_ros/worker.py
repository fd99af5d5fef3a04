"""Inference off the executor thread: one worker thread and a one-slot mailbox.
A newer job replaces a waiting one (latest wins, nothing queues up); every
replaced job is counted, and every job that runs ends in on_done with a result
or an error."""
from __future__ import annotations

import threading
import time


class InferenceWorker:
    def __init__(self, run, on_done):
        self._run, self._on_done = run, on_done
        self._slot = None
        self._cv = threading.Condition()
        self._stopping = False
        self.skipped = 0
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="x2p-inference", daemon=True)
        self._thread.start()

    def submit(self, job) -> bool:
        """Queues a job; True if it replaced one that was still waiting."""
        with self._cv:
            replaced = self._slot is not None
            if replaced:
                self.skipped += 1
            self._slot = job
            self._cv.notify()
        return replaced

    def _loop(self):
        while True:
            with self._cv:
                while self._slot is None and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job, self._slot = self._slot, None
                self.busy = True
            start = time.perf_counter()
            try:
                result, error = self._run(job), None
            except Exception as e:  # reported, never fatal: the node must keep running
                result, error = None, e
            self.busy = False
            self._on_done(job, result, error, time.perf_counter() - start)

    def stop(self, timeout: float = 5.0):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
