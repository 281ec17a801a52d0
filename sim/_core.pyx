"""Compiled simulator core (placeholder)."""

AVAILABLE = True
