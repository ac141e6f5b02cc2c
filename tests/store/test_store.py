"""The store: migrations, SQLite settings, constraints that make bad states impossible."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from rewardloop.data import schema as S
from rewardloop.data.store import Store
from rewardloop.errors import UserError


def _task_with_two_responses(session, prompt: str = "hi") -> S.ComparisonTask:
    p = S.Prompt(text=prompt, content_hash=S.content_hash(prompt))
    r1 = S.Response(prompt=p, text="a", content_hash=S.content_hash("a"))
    r2 = S.Response(prompt=p, text="b", content_hash=S.content_hash("b"))
    t = S.ComparisonTask(prompt=p, kind="pairwise", overlap=2)
    t.items = [S.TaskItem(response=r1, position=0), S.TaskItem(response=r2, position=1)]
    session.add(t)
    session.flush()
    return t


def test_migrated_to_head_with_all_tables(store: Store) -> None:
    assert store.revision() is not None
    for table in ("annotators", "prompts", "responses", "tasks", "judgments", "audit_log"):
        assert table in store.tables()


def _one_judgment(store: Store, key: str, best: int = 0) -> tuple[int, int, list[int]]:
    """A task, an annotator and their judgment (response ``best`` first): task and annotator
    ids and the task's response ids."""
    with store.write() as s:
        t = _task_with_two_responses(s)
        a = S.Annotator(name="ann")
        s.add(a)
        s.flush()
        ids = [i.response_id for i in t.items]
        s.add(S.Judgment(task=t, annotator=a, ranking=[[ids[best]], [ids[1 - best]]],
                         idempotency_key=key, source="human"))
        return t.id, a.id, ids


def test_one_judgment_per_task_and_annotator(store: Store) -> None:
    task_id, ann_id, _ = _one_judgment(store, "k1")
    with pytest.raises(IntegrityError):
        with store.write() as s:
            s.add(S.Judgment(task_id=task_id, annotator_id=ann_id, ranking=[[1], [2]],
                             idempotency_key="k2"))


def test_idempotency_key_unique_per_annotator(store: Store) -> None:
    """One annotator's keys never collide with another's (migration 0004): a user cannot take
    someone else's predictable keys first and block their judgments."""
    with store.write() as s:
        t = _task_with_two_responses(s)
        t.overlap = 3
        a, b = S.Annotator(name="a"), S.Annotator(name="b")
        s.add_all([a, b])
        s.flush()
        s.add(S.Judgment(task=t, annotator_id=a.id, ranking=[[1], [2]], idempotency_key="same"))
        task_id, a_id, b_id = t.id, a.id, b.id
    with store.write() as s:  # the same key from another annotator is theirs to use
        s.add(S.Judgment(task_id=task_id, annotator_id=b_id, ranking=[[2], [1]],
                         idempotency_key="same"))
    with pytest.raises(IntegrityError), store.write() as s:
        t2 = _task_with_two_responses(s, prompt="another prompt")
        s.add(S.Judgment(task=t2, annotator_id=a_id, ranking=[[2], [1]],
                         idempotency_key="same"))


def test_database_audits_judgments_and_keeps_the_log_append_only(store: Store) -> None:
    task_id, ann_id, ids = _one_judgment(store, "k", best=1)
    with store.read() as s:
        (event,) = s.scalars(select(S.AuditEvent)).all()
        judgment = s.scalars(select(S.Judgment)).one()
        assert (event.action, event.actor_id) == ("judgment.create", ann_id)
        assert event.payload == {"judgment_id": judgment.id, "task_id": task_id,
                                 "ranking": [[ids[1]], [ids[0]]], "idempotency_key": "k",
                                 "source": "human"}
        assert event.at.replace(tzinfo=None) == judgment.created_at.replace(tzinfo=None)
    for change in (update(S.AuditEvent).values(action="judgment.delete"),
                   update(S.AuditEvent).values(payload={}), delete(S.AuditEvent)):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.write() as s:
                s.execute(change)
    with store.write() as s:  # erasing a user nulls their actor id (the foreign key's action)
        s.execute(update(S.AuditEvent).values(actor_id=None))
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.AuditEvent)) == 1


def test_failed_write_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.write() as s:
            s.add(S.Annotator(name="ghost"))
            s.flush()
            raise RuntimeError("boom")
    with store.read() as s:
        assert s.query(S.Annotator).count() == 0


def test_bad_kind_and_overlap_refused(store: Store) -> None:
    for bad in ({"kind": "triple"}, {"kind": "pairwise", "overlap": 0}):
        with pytest.raises(IntegrityError):
            with store.write() as s:
                p = S.Prompt(text="x", content_hash=S.content_hash(repr(bad)))
                s.add(S.ComparisonTask(prompt=p, **bad))


def test_sqlite_pragmas(sqlite_store: Store) -> None:
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_backup_copies_live_database(sqlite_store: Store, tmp_path) -> None:
    with sqlite_store.write() as s:
        s.add(S.Annotator(name="kept"))
    dest = sqlite_store.backup(tmp_path / "copy.db")
    copy = Store(f"sqlite:///{dest}")
    with copy.read() as s:
        assert [a.name for a in s.query(S.Annotator)] == ["kept"]


def test_bad_urls_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not a database URL"):
        Store("not a url")
    with pytest.raises(UserError, match="unsupported database"):
        Store("mysql://u@h/db")
    with pytest.raises(UserError, match="does not exist"):
        Store(f"sqlite:///{tmp_path}/missing/dir/x.db")


@pytest.mark.parametrize("url, message", [
    ("sqlite://rewardloop.db", "not a database URL (after sqlite:// comes a host name); "
                               "did you mean sqlite:///rewardloop.db?"),
    ("sqlite://runs/x.db", "did you mean sqlite:///runs/x.db?"),
    ("postgresql+psycopg://u:p@h:notaport/db", "is not a database URL; use sqlite:///FILE"),
    ("sqlite:///x.db?timeout=soon", "is not a database URL; use sqlite:///FILE"),
    ("sqlite://", "is an in-memory database, gone when the command ends"),
    ("sqlite:///:memory:", "is an in-memory database, gone when the command ends"),
    ("sqlite:///file:x?mode=memory&uri=true", "is an in-memory database"),
])
def test_malformed_and_in_memory_urls_are_one_line_and_exit_2(
        url: str, message: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo'd URL is one line, not SQLAlchemy's traceback; a store that vanishes with the
    command (it reported success, and the data was gone) is refused. From --db and from
    $REWARDLOOP_DB alike, and nothing is created."""
    from typer.testing import CliRunner

    from rewardloop.cli import app

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        Store(url)
    add = ["users", "add", "zed", "--role", "annotator", "--token"]
    for argv, env in ((["--db", url], {}), ([], {"REWARDLOOP_DB": url})):
        result = CliRunner().invoke(app, add + argv, env=env)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_ranking_helpers() -> None:
    assert S.validate_ranking([[3], [1, 2]], [1, 2, 3]) == [[3], [1, 2]]
    with pytest.raises(ValueError, match="twice"):
        S.validate_ranking([[1], [1]], [1, 2])
    with pytest.raises(ValueError, match="each of the task's responses"):
        S.validate_ranking([[1]], [1, 2])
    assert S.ranking_pairs([[3], [1, 2]]) == [(3, 1, False), (3, 2, False), (1, 2, True)]


def test_migrations_match_the_models(store: Store) -> None:
    """A model change without its migration (or the reverse) fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), S.Base.metadata)
    # Alembic cannot compare expression indexes (priority DESC) on SQLite: it reports them as
    # removed and re-added. Everything else must match exactly.
    diff = [d for d in diff if not (d[0] in ("add_index", "remove_index")
                                    and d[1].name == "ix_tasks_next")]
    assert diff == []


def _at_revision(store: Store, revision: str) -> None:
    """Migrate ``store`` (made with ``migrate=False``) up or down to ``revision``."""
    from alembic import command

    cfg = store._alembic_config()
    current = store.revision()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        if current is not None and current > revision:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


def _legacy_judgment(store: Store, key: str) -> tuple[int, list[int], dict[str, int]]:
    """(task id, its two response ids, annotator ids by name): annotators ``a`` (group ``g``)
    and ``b`` (none), and a task of overlap 2 judged once by ``a`` with ``key``, written through
    the tables as the database has them (reflected), not the current models: for a store at an
    old revision."""
    import datetime as dt

    from sqlalchemy import MetaData, insert

    meta = MetaData()
    meta.reflect(store.engine)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with store.engine.begin() as conn:
        def add(table: str, **values) -> int:
            t = meta.tables[table]
            return conn.execute(insert(t).values(**values).returning(t.c.id)).scalar_one()

        who = {name: add("annotators", name=name, role="annotator", active=True, groups=groups,
                         attributes={}, kind="human", created_at=now)
               for name, groups in (("a", ["g"]), ("b", []))}
        prompt = add("prompts", text="hi", meta={}, content_hash="hi", created_at=now)
        rids = [add("responses", prompt_id=prompt, text=t, gen_settings={}, meta={},
                    content_hash=t, created_at=now) for t in "ab"]
        task = add("tasks", prompt_id=prompt, kind="pairwise", overlap=2, is_gold=False,
                   priority=0.0, n_judgments=1, done=False, meta={}, created_at=now)
        for i, rid in enumerate(rids):
            add("task_items", task_id=task, response_id=rid, position=i)
        add("judgments", task_id=task, annotator_id=who["a"], ranking=[[rids[0]], [rids[1]]],
            idempotency_key=key, source="human", meta={}, created_at=now)
    return task, rids, who


def test_migration_0004_keeps_judgments_and_the_audit_trigger(tmp_path) -> None:
    """Upgrading a store that has judgments (SQLite rebuilds the table) keeps every row, the
    indexes and the audit trigger, and makes keys per annotator."""
    store = Store(f"sqlite:///{tmp_path / 'old.db'}", migrate=False)
    _at_revision(store, "0003")
    task_id, rids, who = _legacy_judgment(store, "shared-key")
    _at_revision(store, "0004")
    assert store.revision() == "0004"
    with store.write() as s:
        s.add(S.Judgment(task_id=task_id, annotator_id=who["b"], ranking=[[rids[1]], [rids[0]]],
                         idempotency_key="shared-key"))
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.Judgment)) == 2
        actions = s.scalars(select(S.AuditEvent.action)).all()
        assert actions == ["judgment.create", "judgment.create"]  # the trigger still fires
        indexes = {row[0] for row in s.execute(text(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'judgments'"))}
        assert {"ix_judgments_task_id", "ix_judgments_annotator_id"} <= indexes
    store.dispose()


def test_migration_0005_adds_task_audience_to_an_existing_store(db_url: str) -> None:
    """A store made at 0004 with a half-judged task upgrades to 0005: the task keeps its rows
    and is for everyone (audience NULL), so the queue hands it to an annotator of no group; the
    judgment audit trigger still fires; the downgrade removes the column again."""
    from sqlalchemy import inspect

    from rewardloop.feedback import queue as Q

    def columns() -> set[str]:
        return {c["name"] for c in inspect(store.engine).get_columns("tasks")}

    store = Store(db_url, migrate=False)
    _at_revision(store, "0004")
    assert "audience" not in columns()
    task_id, rids, who = _legacy_judgment(store, "k")
    _at_revision(store, "0005")
    assert "audience" in columns()
    store.migrate()  # the queue below uses the current models
    with store.write() as s:
        assert s.get(S.ComparisonTask, task_id).audience is None
        lease = Q.next_task(s, who["b"])
        assert lease is not None and lease.task_id == task_id
        Q.submit_judgment(s, who["b"], task_id, [[rids[1]], [rids[0]]], idempotency_key="k")
    with store.read() as s:
        assert s.get(S.ComparisonTask, task_id).done
        assert s.scalars(select(S.AuditEvent.action)).all() == ["judgment.create"] * 2
    _at_revision(store, "0004")
    assert "audience" not in columns()
    store.dispose()


def test_migration_0006_keeps_the_guideline_version_of_open_leases(db_url: str) -> None:
    """A store made at 0005 with an open lease on a task of a batch with guidelines upgrades to
    0006: the open lease gets the version it was shown (the batch's), and the judgment records
    it even when the guidelines change before the submit; the downgrade drops the column."""
    import datetime as dt

    from sqlalchemy import MetaData, insert, inspect, update

    from rewardloop.feedback import queue as Q

    def columns() -> set[str]:
        return {c["name"] for c in inspect(store.engine).get_columns("assignments")}

    store = Store(db_url, migrate=False)
    _at_revision(store, "0005")
    task_id, rids, who = _legacy_judgment(store, "k")
    meta = MetaData()
    meta.reflect(store.engine)
    now = dt.datetime.now(dt.UTC)
    with store.engine.begin() as conn:
        batch = conn.execute(insert(meta.tables["batches"]).values(
            name="b", guidelines="old", guideline_version="v1", meta={}, created_at=now)
            .returning(meta.tables["batches"].c.id)).scalar_one()
        conn.execute(update(meta.tables["tasks"]).values(batch_id=batch))
        conn.execute(insert(meta.tables["assignments"]).values(
            task_id=task_id, annotator_id=who["b"], shown_order=rids, leased_at=now,
            expires_at=now + dt.timedelta(minutes=10), completed=False))
    _at_revision(store, "0006")
    assert "guideline_version" in columns()
    store.migrate()  # the queue below uses the current models
    with store.write() as s:
        assert s.scalar(select(S.Assignment.guideline_version)) == "v1"
        s.get(S.Batch, batch).guideline_version = "v2"
    with store.write() as s:
        got, _ = Q.submit_judgment(s, who["b"], task_id, [[rids[1]], [rids[0]]],
                                   idempotency_key="k")
    assert got.guideline_version == "v1"
    _at_revision(store, "0005")
    assert "guideline_version" not in columns()
    store.dispose()


def test_a_group_name_a_reward_mix_cannot_name_is_refused(tmp_path) -> None:
    """Audit s12 F7: `--reward RUN@group=w,group=w` cannot name a group with , = or @ in it."""
    from typer.testing import CliRunner

    from rewardloop.cli import app

    url = f"sqlite:///{tmp_path / 'x.db'}"
    base = ["users", "add", "zed", "--role", "annotator", "--token", "--db", url]
    for bad in ("team, EU", "a=b", "x@y", " padded"):
        result = CliRunner().invoke(app, [*base, "--group", bad])
        assert result.exit_code == 2, result.output
        assert "none of , = @" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*base, "--group", "R&D <ü>"])
    assert result.exit_code == 0, result.output


def test_commands_upgrading_one_old_store_at_once_wait_for_each_other(db_url: str) -> None:
    """Upgrade audit s15 M1: processes opening a store that needs migrations at the same time
    failed ("database is locked"; on PostgreSQL "relation ... already exists" or a deadlock).
    Now they take turns: each opens it, it ends at the head once, and the log says so."""
    import os
    import subprocess
    import sys

    store = Store(db_url, migrate=False)
    _at_revision(store, "0001")
    store.dispose()
    code = ("import sys; from rewardloop.data.store import Store; "
            "s = Store(sys.argv[1]); print(s.revision()); s.dispose()")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    head = Store(db_url, migrate=False).revision()
    assert [(rc, out.strip()) for rc, out, _ in results] == [(0, head)] * 3, results
    assert sum("upgrading the store's schema" in err and "from revision 0001" in err
               for _, _, err in results) == 1, results


def test_a_store_a_newer_version_upgraded_is_refused_not_touched(db_url: str) -> None:
    """Upgrade audit s15 M2: a store at a revision this version does not know gave alembic's
    traceback (exit 1); now one line, exit 2, and the store is left as it was."""
    from typer.testing import CliRunner

    from rewardloop.cli import app

    store = Store(db_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(UserError, match="schema revision 0099, which this rewardloop does not "
                       "know .*a newer rewardloop upgraded it"):
        Store(db_url)
    res = CliRunner().invoke(app, ["data", "stats", "--db", db_url])
    assert res.exit_code == 2 and "a newer rewardloop upgraded it" in res.output
    assert "Traceback" not in res.output
    assert Store(db_url, migrate=False).revision() == "0099"
    store.dispose()


def test_opening_an_up_to_date_store_does_not_wait_for_a_writer(sqlite_store: Store) -> None:
    """Review s15: the migration lock was taken on every open, so a read-only command waited
    for the whole of another process's write (a long import) with no word."""
    import subprocess
    import sys

    code = "import sys; from rewardloop.data.store import Store; Store(sys.argv[1]).dispose()"
    with sqlite_store.write():  # holds the write lock, as an import in progress does
        done = subprocess.run([sys.executable, "-c", code, sqlite_store.url], timeout=60,
                              capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
