"""The store: a SQLAlchemy engine on SQLite (default) or PostgreSQL, migrated by Alembic.

SQLite is set up the way it is safe under a web server: WAL journal, foreign keys on for every
connection, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so two writers queue
instead of failing half-way with "database is locked". Writers first take an OS file lock next
to the database (``FILE.writelock``): a waiting writer then starts the moment the previous one
commits, where SQLite's own busy timeout would poll with sleeps of up to 100 ms (which made
`serve --workers 2` slower than one worker). Reads use deferred transactions and run beside the
writer (WAL).

Use ``Store.read()`` for queries and ``Store.write()`` for changes; both are context managers
yielding an ORM session. ``write()`` commits on success and rolls back on any exception, so an
import is all or nothing.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from rewardloop.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: SQLite's busy timeout alone orders the writers
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///rewardloop.db"
MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "rewardloop_write"


def default_url() -> str:
    """``$REWARDLOOP_DB`` or the SQLite file ``rewardloop.db`` in the working directory."""
    return os.environ.get("REWARDLOOP_DB", DEFAULT_URL)


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event (below) issue BEGIN itself, so we choose its kind.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL is durable against process crashes (a server killed with kill -9
        # keeps every committed transaction); only an OS crash or power loss can lose the last
        # few. FULL would fsync on every commit, which cost ~100 ms per judgment on a loaded
        # machine. Set REWARDLOOP_SQLITE_SYNCHRONOUS=FULL to trade that speed for power-loss
        # durability.
        sync = os.environ.get("REWARDLOOP_SQLITE_SYNCHRONOUS", "NORMAL").upper()
        if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            sync = "NORMAL"
        cur.execute(f"PRAGMA synchronous={sync}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _create_private(path: Path) -> None:
    """Create a new SQLite file readable by its owner only (0600): it holds the session secret
    and password hashes. SQLite gives its -wal and -shm files the same mode. An existing file
    keeps the mode its owner chose."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}") from None


_MIGRATION_LOCK = 0x72_6c_6d_69_67  # "rlmig": the PostgreSQL advisory lock of migrations


def _too_new(url: str, current: str, head: str | None) -> str:
    return (f"--db: {url} is at schema revision {current}, which this rewardloop does not know "
            f"(its newest is {head}): a newer rewardloop upgraded it. Use that version or a "
            "later one; a store is never downgraded")


def _not_a_url(url: str) -> UserError:
    return UserError(f"--db: {url!r} is not a database URL; use sqlite:///FILE or "
                     "postgresql+psycopg://USER:PASS@HOST/DB")


def _in_memory(parsed: URL) -> bool:
    """A SQLite URL whose database lives in the process only (``sqlite://``, ``:memory:``,
    a ``mode=memory`` URI)."""
    db = parsed.database or ""
    return (db in ("", ":memory:") or db.startswith("file::memory:")
            or parsed.query.get("mode") == "memory")


def parse_url(url: str) -> URL:
    """``url`` parsed, if rewardloop can keep a store there: SQLite in a file, or PostgreSQL.

    Raises UserError for text that is no URL (a non-numeric port, ``sqlite://FILE`` with two
    slashes, which would name a host), another database, and in-memory SQLite, which would
    drop everything a command stores the moment it ends.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise _not_a_url(url) from None
    dialect = parsed.get_backend_name()
    if dialect not in ("sqlite", "postgresql"):
        raise UserError(f"--db: unsupported database {dialect!r}; use sqlite or postgresql")
    if dialect == "sqlite" and parsed.host:
        path = "/".join(p for p in (parsed.host, parsed.database) if p)
        raise UserError(f"--db: {url!r} is not a database URL (after sqlite:// comes a host "
                        f"name); did you mean sqlite:///{path}?")
    if dialect == "sqlite" and _in_memory(parsed):
        raise UserError(f"--db: {url!r} is an in-memory database, gone when the command ends; "
                        "give a file: sqlite:///FILE")
    return parsed


def store_files(url: str) -> list[Path]:
    """The files a SQLite store at ``url`` consists of (database, WAL, shared memory, write
    lock): what no output may overwrite. Empty for other databases and unusable URLs."""
    try:
        parsed = parse_url(url)
    except UserError:
        return []
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db:
        return []
    return [Path(db + suffix) for suffix in ("", "-wal", "-shm", ".writelock")]


class _WriteLock:
    """Writers of one SQLite file, across threads and processes, one at a time: a re-entrant
    thread lock, then ``flock`` on ``path`` (held by the outermost holder only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fd = self._fd
            if self._depth == 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._thread:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Store:
    """One database: engine, sessions, migrations."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, echo: bool = False,
                 existing: bool = False) -> None:
        """``existing``: the database must be there already (commands that only read it, or
        change what it holds): a mistyped SQLite path is then an error, not a new empty
        database that reads as "nothing collected yet"."""
        self.url = url or default_url()
        parsed = parse_url(self.url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo}
        file: Path | None = None  # the SQLite database
        if self.dialect == "sqlite":
            assert parsed.database  # an in-memory database is refused by parse_url
            file = Path(parsed.database)
            if not file.parent.exists():
                raise UserError(f"--db: directory {file.parent} does not exist")
            if existing and not file.is_file():
                raise UserError(f"--db: no database at {file} (check the path or $REWARDLOOP_DB; "
                                "`rewardloop data import`, `tasks create` or `users add` "
                                "create one)")
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        try:
            self.engine = create_engine(parsed, **kwargs)
        except ModuleNotFoundError as exc:
            raise UserError(
                f"--db: the driver for {self.dialect} is not installed ({exc.name}); "
                "pip install 'rewardloop[postgres]'"
            ) from None
        except (ArgumentError, ValueError, TypeError):  # a query argument the driver refuses
            raise _not_a_url(self.url) from None
        self._write_lock: _WriteLock | None = None
        if file is not None:
            _create_private(file)  # before the first connection creates it
            _setup_sqlite(self.engine)
            if fcntl is not None:
                self._write_lock = _WriteLock(Path(f"{file}.writelock"))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    # -- sessions -------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries. Closing it ends the transaction without writing and leaves
        the loaded objects usable (detached, attributes kept), unlike an explicit rollback,
        which would expire them."""
        with self._sessions() as session:
            if self.dialect == "postgresql":
                # One snapshot for the whole read, as SQLite's read transaction has: under
                # READ COMMITTED each statement sees its own, and the admin page's dozen counts
                # disagree with each other while judgments arrive.
                session.connection(execution_options={"isolation_level": "REPEATABLE READ",
                                                      "postgresql_readonly": True})
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on any exception."""
        with self._writer_turn(), self._sessions() as session:
            session.connection(execution_options={_WRITE: True})
            try:
                yield session
                session.commit()
            except BaseException:
                # A Ctrl-C can land after the commit (while SQLAlchemy expires the loaded
                # objects); the rollback then refuses, and its error must not hide the first.
                with suppress(Exception):
                    session.rollback()
                raise

    def _writer_turn(self) -> Any:
        return self._write_lock.held() if self._write_lock is not None else nullcontext()

    # -- migrations -----------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config  # alembic: only when migrating (see migrate)

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def migrate(self) -> None:
        """Bring the schema to the newest revision (creates it on an empty database).

        One process at a time: commands that open a store needing an upgrade at once wait for
        each other (the write lock and ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
        PostgreSQL) instead of failing half-way; the later ones find it upgraded. A store at a
        revision this version does not know (a newer rewardloop upgraded it) is refused, never
        downgraded.
        """
        # Alembic takes about half a second to import; only migrations need it.
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = self._alembic_config()
        scripts = ScriptDirectory.from_config(cfg)
        head = scripts.get_current_head()
        try:
            with self.engine.connect() as conn:  # up to date: no lock (a writer may hold it)
                if MigrationContext.configure(conn).get_current_revision() == head:
                    return
            with self._writer_turn(), self.engine.connect() as conn:
                conn = conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                     {"key": _MIGRATION_LOCK})
                    current = MigrationContext.configure(conn).get_current_revision()
                    known = {script.revision for script in scripts.walk_revisions()}
                    if current is not None and current not in known:
                        raise UserError(_too_new(self.safe_url, current, head))
                    if current is not None and current != head:
                        log.warning("upgrading the store's schema at %s from revision %s to %s "
                                    "(older rewardloop versions cannot open it afterwards)",
                                    self.safe_url, current, head)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
        except DatabaseError as exc:  # OperationalError too; "file is not a database"
            raise UserError(f"--db: cannot open {self.safe_url}: {exc.orig}") from None

    def revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext  # see migrate

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def backup(self, dest: str | Path) -> Path:
        """Copy a SQLite database safely while it is in use (the backup API, not a file copy)."""
        if self.dialect != "sqlite":
            raise UserError("backup is for SQLite stores; use pg_dump for PostgreSQL")
        dest = Path(dest)
        _create_private(dest)  # a copy of the secrets, so as private as the original
        raw = self.engine.raw_connection()
        try:
            target = sqlite3.connect(dest)
            with target:
                raw.driver_connection.backup(target)  # type: ignore[union-attr]
            target.close()
        finally:
            raw.close()
        return dest

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()
