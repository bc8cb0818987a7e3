"""Ledger totals by the minute as well as the hour, rebuilt from the entries.

A window's start then reads at most 30 minute totals and one minute of entries instead of
up to half an hour of entries. The table is rebuilt (its key gains the span) and every
total is recomputed from ``ledger_entries``: that also repairs a database whose entries
predate revision 0005, which created the hourly totals empty.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

from custody.storage.types import BigInt

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The start of an entry's hour or minute, in UTC, as each database stores it. SQLite holds
# timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text (UTC), and amounts as decimal text that
# only the exact ``custody_sum`` aggregate (registered on the service's connections) adds.
_START = {
    ("postgresql", 3600): "date_trunc('hour', at, 'UTC')",
    ("postgresql", 60): "date_trunc('minute', at, 'UTC')",
    ("sqlite", 3600): "substr(at, 1, 13) || ':00:00.000000'",
    ("sqlite", 60): "substr(at, 1, 16) || ':00.000000'",
}


def _fill(spans: tuple[int, ...], *, with_span: bool) -> None:
    """Recompute every total from ``ledger_entries``, one grouped INSERT ... SELECT per span."""
    connection = op.get_bind()
    dialect = connection.dialect.name
    total = "custody_sum(amount)" if dialect == "sqlite" else "sum(amount)"
    for span in spans:
        start = _START[(dialect, span)]
        columns, values = ("span, ", f"{span}, ") if with_span else ("", "")
        # Every interpolated piece is one of this module's constants. (Sent as it is: text() would
        # read the ":00" of a time as a parameter.)
        connection.exec_driver_sql(
            f"INSERT INTO ledger_buckets (wallet_id, counter, {columns}bucket, agent_id, amount) "  # noqa: S608  # nosec B608
            f"SELECT wallet_id, counter, {values}{start}, agent_id, {total} FROM ledger_entries "
            f"GROUP BY wallet_id, counter, {start}, agent_id"
        )


def upgrade() -> None:
    op.drop_table("ledger_buckets")
    op.create_table(
        "ledger_buckets",
        sa.Column("wallet_id", sa.String(40), primary_key=True),
        sa.Column("counter", sa.String(80), primary_key=True),
        sa.Column("span", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("agent_id", sa.String(40), primary_key=True),
        sa.Column("amount", BigInt, nullable=False),
    )
    op.create_index("ix_ledger_buckets_agent", "ledger_buckets", ["wallet_id", "agent_id", "counter", "span", "bucket"])
    _fill((3600, 60), with_span=True)


def downgrade() -> None:
    op.drop_index("ix_ledger_buckets_agent", table_name="ledger_buckets")
    op.drop_table("ledger_buckets")
    op.create_table(
        "ledger_buckets",
        sa.Column("wallet_id", sa.String(40), primary_key=True),
        sa.Column("counter", sa.String(80), primary_key=True),
        sa.Column("agent_id", sa.String(40), primary_key=True),
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("amount", BigInt, nullable=False),
    )
    _fill((3600,), with_span=False)
