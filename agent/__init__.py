"""Precision search: the environment, the agents and the search driver."""
