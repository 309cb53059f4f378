"""Hessian-aware compression: pruning (OBD/OBS) and quantization."""

__all__: list[str] = []
