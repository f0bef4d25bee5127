"""What the routes call: predictions, references, authentication, limits, idempotency."""
