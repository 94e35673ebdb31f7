"""Replication: the ordered write stream of a pair and the links to peers.

``queue`` is the sans-I/O core (sequence numbers, batching, cumulative
acknowledgement); ``link`` the channel and keepalive to one peer; ``stream``
the I/O that drives one pair's queue over a link.  Nothing here knows what
a pair's status is: a broken stream hands its unacknowledged entries to a
callback.
"""
