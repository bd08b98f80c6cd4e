"""The caller's side: sending signals to pools over the broker and reading their status.

It runs wherever a Celery app sends tasks (a web process, a script, another worker) and
needs no worker of its own.
"""
