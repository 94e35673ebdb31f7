"""Procedures: backup and restore, above the pair machinery.

They drive pairs through the narrow interface of ``operations`` (which the
pair manager satisfies) and are never imported by the pairs layer: the
mirror end reaches the backup procedure only through the marker handler the
daemon's wiring gives it.
"""
