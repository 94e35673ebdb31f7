"""Ports: the faces of a daemon, and who may use them.

``hostapi`` (the host API over gRPC), ``interconnect`` (what a peer system
may ask), ``nbdexport`` (volumes as NBD exports, on the same write path),
``access`` (roles, bearer tokens, rate limits, audit of refusals) and
``malformed`` (requests that do not parse).  They turn requests into calls
of the procedures, the pair manager and the storage system, and errors into
statuses.
"""
