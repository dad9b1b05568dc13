"""Helpers for the loader fault tests that worker processes must be able to import."""

import multiprocessing
import os
import signal

from jmed.transforms import IntensityTransform


class KillWorkerAt(IntensityTransform):
    """Deterministic in appearance; kills the worker process that preprocesses ``index``."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def apply(self, subject, params):
        if (
            subject.metadata.get("subject_index") == self.index
            and multiprocessing.parent_process() is not None
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return subject
