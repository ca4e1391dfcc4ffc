"""nuslerp, multislerp, karcher, model_stock, nearswap, ram, arcee_fusion, passthrough."""
from __future__ import annotations

__all__: list = []
