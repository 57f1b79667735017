"""One router per concern: jobs, their event streams, health/metrics, inbound Hub webhooks."""
