"""Many annotators at once through the HTTP API: exact counts, overlap never exceeded."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import func, select

from rewardloop.data import schema as S


@pytest.mark.slow
def test_concurrent_annotators_over_http(store, make_server) -> None:
    users = [f"u{i}" for i in range(6)]
    server = make_server(store, n_tasks=15, overlap=3, users=users)
    judged: dict[str, list[int]] = {u: [] for u in users}
    errors: list[str] = []

    def work(user: str) -> None:
        client = server.client(user)
        for _ in range(40):
            r = client.get("/api/tasks/next")
            if r.status_code == 204:
                return
            lease = r.json()
            ids = [x["id"] for x in lease["responses"]]
            body = {"task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]],
                    "idempotency_key": uuid.uuid4().hex}
            r = client.post("/api/judgments", json=body)
            if r.status_code != 201:
                errors.append(f"{user}: {r.status_code} {r.text}")
                return
            judged[user].append(lease["task_id"])
        errors.append(f"{user}: never ran out of tasks")

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(len(v) for v in judged.values()) == 15 * 3
    assert all(len(v) == len(set(v)) for v in judged.values())
    with store.read() as s:
        per_task = dict(s.execute(select(S.Judgment.task_id, func.count())
                                  .group_by(S.Judgment.task_id)).all())
        assert per_task == dict.fromkeys(server.task_ids, 3)
        assert s.scalar(select(func.count()).where(S.ComparisonTask.done.is_(False))) == 0
        audited = s.scalar(select(func.count()).where(S.AuditEvent.action == "judgment.create"))
        assert audited == 45
