"""Operating warm pools: the command line, Prometheus metrics, the server-less broker and
running worker processes. Each module is imported on its own; this package imports none.
"""
