"""Everything that runs inside ``celery worker``: where agents are built, how a call is
served, how children report to the main process, and the commands a worker answers.

Entry points are :class:`~celery_warmpool.worker.bootstep.WarmPoolStep` (the worker
bootstep) and :class:`~celery_warmpool.worker.runtime.WorkerRuntime` (the worker's life
cycle, one per app); :class:`celery_warmpool.WarmPool` installs both.
"""
