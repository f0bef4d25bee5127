"""Operator tooling: the `klein` CLI, `klein up` on embedded services, and the local processes it starts."""
