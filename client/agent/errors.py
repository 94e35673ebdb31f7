"""The restore agent's one error type."""


class AgentError(Exception):
    """A restore-agent failure, with a one-line message for the operator."""
