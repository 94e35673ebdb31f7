"""The daemon: settings, wiring and the process ``primaryd`` and ``secondaryd`` run.

``config`` reads the settings (flags, TOML); ``main`` builds a storage
system, its pair manager and procedures, the servers of the ports, and
serves until stopped.
"""
