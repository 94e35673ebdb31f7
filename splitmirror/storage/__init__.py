"""Storage: volumes, track bitmaps, the copy management table, write intent and write ordering.

The bottom of the core: these modules know nothing of pairs, peers or
replication; they import only the foundation (errors, status).
"""
