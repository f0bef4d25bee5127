"""fuzz tier."""
