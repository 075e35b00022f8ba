"""crmsync: one shared phone book and call history for a team's Android phones."""

__version__ = "0.1.0"
