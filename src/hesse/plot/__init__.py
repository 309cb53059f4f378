"""Plots of result objects (matplotlib only, imported lazily inside each function)."""

__all__: list[str] = []
