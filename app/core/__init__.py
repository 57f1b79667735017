"""Settings, auth and request checks shared by the API routes (and, where noted, the workers)."""
