"""The API's clients and plumbing: PostgreSQL, storage, URL fetching, the completion waiter, middleware."""
