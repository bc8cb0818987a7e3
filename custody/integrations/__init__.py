"""Integrations of the agent SDK with agent frameworks and payment protocols."""
