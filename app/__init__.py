"""fapm-service API: FastAPI over Redis job state. Imports no torch (`import app.main` stays light)."""
