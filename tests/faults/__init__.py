"""faults tier."""
