"""splitmirror: remote block-volume mirroring with point-in-time backups.

The shared core of ``primaryd`` and ``secondaryd``: volumes, track bitmaps,
the copy management table, the pair state machine, replication and resync.
"""

__version__ = "0.1.0"
