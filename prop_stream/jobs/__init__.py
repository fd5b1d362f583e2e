"""The job worker: carries out the outbox's money movements exactly once."""

from prop_stream.jobs.worker import JobWorker, WorkerStats

__all__ = ["JobWorker", "WorkerStats"]
