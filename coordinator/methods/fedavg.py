"""FedIT (FedAvg of LoRA factors): one global adapter at one common rank; mean of A and of B.

Every device trains the same rank (`common_rank`), so the average of the factors is taken as
is. It is not the average of the products B_k A_k (use `svd` or `stack` for that).
"""
from __future__ import annotations

from .base import Method


class FedAvg(Method):
    name = "fedavg"
    summary = "FedIT: mean of A and of B at one common rank"
