"""Analyses composed from operators and linalg results (never re-implementing algorithms)."""

__all__: list[str] = []
