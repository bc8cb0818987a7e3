"""Persistence: SQLModel tables, Alembic migrations, and the SQL implementations of the storage ports."""
