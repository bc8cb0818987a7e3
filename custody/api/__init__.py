"""The HTTP API (FastAPI). Build it with :func:`custody.api.app.create_app`."""
