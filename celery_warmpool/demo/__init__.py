"""The demo: ``python -m celery_warmpool.demo`` runs a worker with two warm pools on an
embedded broker and uses them (see :mod:`.runner`; the app is :mod:`.app`).
"""
