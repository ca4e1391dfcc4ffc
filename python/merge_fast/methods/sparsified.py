"""TIES, DARE, breadcrumbs, DELLA and SCE: sparsify the task vectors, then merge."""
from __future__ import annotations

__all__: list = []
