"""The search driver."""
