"""Job records and their Redis store: the contract between the API and the workers (no torch)."""
