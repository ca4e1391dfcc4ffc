"""Fisher-weighted averaging and Fisher-dampened deltas."""
from __future__ import annotations

__all__: list = []
