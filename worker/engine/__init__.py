"""The pruning engine: takes a JobSpec, sources, a sink and a progress callback; knows nothing of
HTTP, Celery or Redis. `pipeline.run_prune` is the one loop that the CLI, the worker and the tests
all use."""
