"""The store's tables and their numbered migrations.

Every table is declared once, with SQLAlchemy Core, in types both SQLite and PostgreSQL
understand. The schema is never created directly: :func:`migrate` reads the version in
``schema_version`` (0 for a new or empty database) and applies each numbered migration above
it, each in its own transaction together with the row that records it. Applying twice is a
no-op, and a database written by an older sonde is brought up to date when it is opened.

Timestamps (``started_at``, ``updated_at``, ``heartbeat_at``, ``ended_at``, ``applied_at``) are UTC seconds since
the epoch, as floats: one portable type, ordered and cheap to compare.

Example:
    >>> from sqlalchemy import create_engine
    >>> engine = create_engine("sqlite://")
    >>> migrate(engine) == SCHEMA_VERSION
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    column,
    func,
    inspect,
    select,
    table,
)

__all__ = [
    "MIGRATIONS",
    "OLDEST_READABLE",
    "SCHEMA_VERSION",
    "batches",
    "graphs",
    "layers",
    "messages",
    "metadata",
    "migrate",
    "readable_version",
    "records",
    "runs",
    "schema_version",
    "series",
]

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Double, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("model", Text, nullable=False, default=""),
    Column("framework", Text, nullable=False, default=""),
    Column("config", Text, nullable=False, default="{}"),  # JSON object
    Column("status", Text, nullable=False, default="running"),  # running | finished | failed
    Column("started_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("ended_at", Double, nullable=True),
    # Kept up to date by every write, so that listing runs and resuming one never scans records.
    Column("last_step", Integer, nullable=True),
    # The writer's last sign of life: every write and, while the run is open, a beat every few
    # seconds. A running run whose heartbeat is old is shown as stalled (sonde.store.status).
    Column("heartbeat_at", Double, nullable=True),
)

layers = Table(
    "layers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("type", Text, nullable=False, default=""),
    Column("param_shapes", Text, nullable=False, default="{}"),  # JSON {param: [dims]}
    UniqueConstraint("run_id", "name", name="uq_layers_run_name"),
)

records = Table(
    "records",
    metadata,
    # INTEGER on SQLite makes the key the rowid itself (no second b-tree); BIGINT elsewhere.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("value", Double, nullable=True),  # scalar metrics (NULL for arrays and NaN)
    Column("array", LargeBinary, nullable=True),  # 1-D float64, little-endian bytes
    # The row of ``series`` this record belongs to: its phase, layer, topic and metric are there,
    # once, not in every record (version 4 dropped them here: a third of the ingest time and of
    # the file). Every query is a range of the integer index below; an index on the text columns
    # instead cost 2.5x the ingest time and was slower to read.
    Column("series_id", Integer, nullable=True),
    # Covering (value included): a downsampled series is computed from the index alone.
    Index("ix_records_series_step", "series_id", "step", "value"),
)


# The batch ids already stored, so that a client replaying a batch (after a timeout, a restart)
# stores nothing twice. Written in the same transaction as the batch's records.
batches = Table(
    "batches",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("batch_id", Text, nullable=False),
    Column("received_at", Double, nullable=False),
    PrimaryKeyConstraint("run_id", "batch_id", name="pk_batches"),
)

# A run's topology (sonde.graph's JSON), one per run.
graphs = Table(
    "graphs",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True, autoincrement=False),
    Column("graph", Text, nullable=False),  # JSON object
    Column("updated_at", Double, nullable=False),
)

# The catalog of series a run has: one row per (phase, layer, topic, metric), kept by every
# write. Listing what a run recorded, or the layers of a heatmap, then never scans records.
series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("phase", Text, nullable=False),
    Column("layer", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("metric", Text, nullable=False),
    UniqueConstraint("run_id", "phase", "layer", "topic", "metric", name="uq_series"),
)

# The readable text of the Records that carry one (alerts); the Record itself is in ``records``.
messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("phase", Text, nullable=False),
    Column("layer", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("metric", Text, nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_messages_run_step", "run_id", "step"),
)


def _migration_1(conn: Connection) -> None:
    """Create runs, layers and records with their indexes."""
    # checkfirst keeps this safe on a database where a crash left some of the tables behind.
    metadata.create_all(conn, tables=[runs, layers, records], checkfirst=True)


def _migration_2(conn: Connection) -> None:
    """Add batch ids (idempotent ingest), graphs and the series catalog, filled from existing records."""
    metadata.create_all(conn, tables=[batches, graphs, series], checkfirst=True)
    present = {c["name"] for c in inspect(conn).get_columns("records")}
    if "series_id" not in present:
        conn.exec_driver_sql("ALTER TABLE records ADD COLUMN series_id INTEGER")
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_records_series")  # version 1's index on the text columns
    if "phase" in present:  # records written by version 1 carry their own names: catalog them
        old = table("records", *(column(n) for n in ("run_id", "phase", "layer", "topic", "metric", "series_id")))
        keys = [old.c.run_id, old.c.phase, old.c.layer, old.c.topic, old.c.metric]
        conn.execute(series.insert().from_select([c.name for c in keys], select(*keys).distinct()))
        match = select(series.c.id).where(*(series.c[c.name] == c for c in keys)).scalar_subquery()
        conn.execute(old.update().where(old.c.series_id.is_(None)).values(series_id=match))
    next(i for i in records.indexes if i.name == "ix_records_series_step").create(conn, checkfirst=True)


def _migration_3(conn: Connection) -> None:
    """Add the messages of Records that carry one (alerts)."""
    metadata.create_all(conn, tables=[messages], checkfirst=True)


def _migration_4(conn: Connection) -> None:
    """Drop the names from records: their series (version 2) holds them once."""
    present = {c["name"] for c in inspect(conn).get_columns("records")}
    for name in ("phase", "layer", "topic", "metric"):
        if name in present:
            conn.exec_driver_sql(f"ALTER TABLE records DROP COLUMN {name}")


def _migration_5(conn: Connection) -> None:
    """Add the runs' heartbeat (the writer's last sign of life), first set to their last update."""
    if "heartbeat_at" not in {c["name"] for c in inspect(conn).get_columns("runs")}:
        kind = Double().compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN heartbeat_at {kind}")
    conn.execute(runs.update().where(runs.c.heartbeat_at.is_(None)).values(heartbeat_at=runs.c.updated_at))


#: Numbered migrations; the position in the list plus one is the version each one produces.
MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                  _migration_5]

#: The oldest schema a read-only store can be read at (version 5 only added ``runs.heartbeat_at``,
#: which reads fall back from to ``updated_at``); an older one must be opened writable once to migrate.
OLDEST_READABLE = 4

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    """The highest applied migration, 0 when none (or no ``schema_version`` table) exists."""
    if not conn.dialect.has_table(conn, schema_version.name):
        return 0
    return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)


def readable_version(engine: Engine) -> int:
    """The schema version of a database that is only read (not migrated), after checking it can be read.

    Raises:
        RuntimeError: no sonde schema there, one older than :data:`OLDEST_READABLE`, or a newer one.
    """
    with engine.connect() as conn, conn.begin():
        version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"the store has schema version {version} but this sonde knows only up to "
                           f"{SCHEMA_VERSION}; upgrade sonde to read it")
    if version == 0:
        raise RuntimeError("it holds no sonde tables (no schema_version), and it is read-only so none can be "
                           "created; pass the path of a store sonde recorded")
    if version < OLDEST_READABLE:
        raise RuntimeError(f"it was written by an older sonde (schema version {version}) and is read-only, so it "
                           f"cannot be brought up to version {SCHEMA_VERSION}; open it once where it can be written")
    return version


def migrate(engine: Engine) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`; returns the version it is at afterwards.

    Raises:
        RuntimeError: the database was written by a newer sonde (its version is above ours).

    Example:
        >>> from sqlalchemy import create_engine
        >>> e = create_engine("sqlite://")
        >>> migrate(e) == migrate(e) == SCHEMA_VERSION
        True
    """
    with engine.connect() as conn, conn.begin():
        metadata.create_all(conn, tables=[schema_version], checkfirst=True)
    # Writes take the database's write lock up front (see store.py), so two processes opening
    # a new store at once apply each migration exactly once: the second sees the first's rows.
    with engine.connect().execution_options(sonde_write=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE schema_version IN EXCLUSIVE MODE")
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the store has schema version {version} but this sonde knows only up to "
                f"{SCHEMA_VERSION}; upgrade sonde to read it"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[number - 1](conn)
            conn.execute(schema_version.insert().values(version=number, applied_at=time.time()))
    return max(version, SCHEMA_VERSION)
