"""deploy tier."""
