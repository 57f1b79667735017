"""HTTP layer: FastAPI routers, request dependencies and the submission path (no torch)."""
