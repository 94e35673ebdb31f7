"""Pairs: the commands and handlers of a pair's ends, and their recovery.

Each role of a pair end has its own module: ``primary_end`` (the commands
issued where a pair is driven from), ``mirror_end`` (the handlers of the end
copied into), ``link_recovery`` (stream failure, peer loss and return,
automatic resync) and ``crash_recovery`` (write intent after an unclean
stop).  ``manager`` is the small facade the host API and the interconnect
call: it picks the module from the role this system plays for the pair.
"""
