"""Property-based fuzzing of every operation in /openapi.json: no input makes a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings


def test_no_server_errors(server) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", server.app)
    headers = {"Authorization": f"Bearer {server.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call(headers=headers)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}"
                                f" {response.text[:200]}")

        fuzz()
    assert not failures, failures
