"""A union-find over channel atoms (ids are consecutive integers handed out in blocks)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["UnionFind"]


class UnionFind:
    """Disjoint sets of atom ids; the smallest id of a set is its root."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        """``n`` fresh singleton atoms."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: Iterable[int], b: Iterable[int]) -> None:
        """Unify ``a[i]`` with ``b[i]`` for every position."""
        for x, y in zip(a, b):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                if rx < ry:
                    self.parent[ry] = rx
                else:
                    self.parent[rx] = ry

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
