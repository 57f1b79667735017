"""The REST API of fapm-service (FastAPI). Imports no torch."""
