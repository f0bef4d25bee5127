"""One module per provider's API shape; what they share is in common.py."""
