"""Algorithms over linear operators (or dense tensors), returning frozen result objects."""

__all__: list[str] = []
