"""Pair state: what a storage system holds of one pair, in memory.

A pair's ends (copy-table row, volume, pending bitmap), the role this
system plays for it, copy progress, retry backoff, and the mirror channel
its primary end writes into.  Data and small invariants only: the pairs
layer decides what happens to them.
"""
