"""Helpers that only tests use (kept out of the installed package)."""
