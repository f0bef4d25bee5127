"""The HTTP surface: every provider's dialect, uploads, delivery, accounts, operators, health."""
