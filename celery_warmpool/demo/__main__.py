"""``python -m celery_warmpool.demo``: see :mod:`celery_warmpool.demo.runner`."""

from .runner import main

main()
