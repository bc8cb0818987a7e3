"""The application layer: what the admin API and the local CLI both call."""
