"""Worker side of fapm-service: the pruning engine, checkpoint I/O, the CLI and (later) Celery tasks.

Importing this package imports no torch; `worker.spec` is shared with the API.
"""
