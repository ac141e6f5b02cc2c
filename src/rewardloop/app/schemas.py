"""Request and response bodies of the JSON API (separate in and out models, strict limits)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewardloop.data.values import IMPORT_KEY_PREFIX

# The store's ids are 32-bit (PostgreSQL's integer): a larger one is no id, and PostgreSQL
# would fail on it rather than find nothing.
MAX_ID = 2**31 - 1
# Text fields: PostgreSQL cannot store NUL, so no input may carry one (a query or form field
# takes this pattern; a JSON body is checked by ``_TextIn``).
NO_NUL = r"^[^\x00]*$"

# A batch named in a query string (?batch=NAME).
BatchQuery = Annotated[str | None, Query(max_length=255, pattern=NO_NUL)]

# Strict: an id is a JSON integer, never "7" or true (lax pydantic would take both).
ResponseId = Annotated[int, Field(ge=1, le=MAX_ID, strict=True)]
Group = Annotated[list[ResponseId], Field(min_length=1, max_length=64)]
StrictIndex = Annotated[int, Field(ge=0, le=63, strict=True)]  # a response's index in its row


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _TextIn(_In):
    """A body whose texts are checked for NUL here (a task upload's rows are checked row by
    row by the data layer, which names the line and field)."""

    @model_validator(mode="after")
    def _no_nul(self) -> _TextIn:
        if any("\x00" in text for text in _texts(self.__dict__)):
            raise ValueError("text may not contain NUL characters (\\u0000)")
        return self


def _texts(value: Any) -> Any:
    """Every string inside ``value`` (dicts' keys and values, lists, models)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, BaseModel):
        yield from _texts(value.__dict__)


class LoginIn(_TextIn):
    username: str = Field(min_length=1, max_length=120)
    password: str = Field(min_length=1, max_length=1024)


class UserOut(BaseModel):
    name: str
    role: str


class LoginOut(BaseModel):
    user: UserOut
    csrf_token: str = Field(description="Send as X-CSRF-Token on state-changing requests.")


class ResponseOut(BaseModel):
    id: int
    text: str


class TaskOut(BaseModel):
    task_id: int
    prompt: str | list[dict[str, Any]] = Field(description="Text, or chat messages.")
    responses: list[ResponseOut] = Field(description="In the order shown to this annotator.")
    kind: str
    guideline_version: str | None = None
    lease_expires_at: dt.datetime


class LeaseOut(BaseModel):
    task_id: int
    lease_expires_at: dt.datetime
    seconds_left: int = Field(description="Seconds from now until the lease runs out (free of "
                              "any difference between the server's and the client's clocks).")


class JudgmentIn(_TextIn):
    task_id: int = Field(ge=1, le=MAX_ID, strict=True)
    ranking: list[Group] = Field(min_length=1, max_length=64,
                                 description="Groups of response ids, best first; a group of "
                                             "two or more is a tie.")
    strength: Literal["slight", "clear", "strong"] | None = None
    rationale: str | None = Field(default=None, max_length=10_000)
    time_ms: int | None = Field(default=None, ge=0, le=7 * 24 * 3600 * 1000, strict=True)
    idempotency_key: str = Field(min_length=1, max_length=128,
                                 description="Unique per judgment; a replay returns the stored "
                                             "judgment instead of a second one.")


    @field_validator("idempotency_key")
    @classmethod
    def _not_an_import_key(cls, key: str) -> str:
        if key.startswith(IMPORT_KEY_PREFIX):
            raise ValueError(f"keys starting with {IMPORT_KEY_PREFIX!r} are reserved for "
                             "imported judgments")
        return key


class JudgmentOut(BaseModel):
    id: int
    task_id: int
    ranking: list[list[int]]
    strength: str | None
    created: bool = Field(description="False when this answers a replayed idempotency key.")


class CandidateRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str | list[dict[str, Any]]
    responses: list[str] = Field(min_length=2, max_length=64)
    models: list[str | None] | None = None


class TasksCreateIn(_In):
    rows: list[CandidateRow] = Field(min_length=1, max_length=5000)
    kind: Literal["pairwise", "ranking"] = "pairwise"
    overlap: int = Field(default=1, ge=1, le=100, strict=True)
    batch: str = Field(min_length=1, max_length=255)
    guidelines: str | None = Field(default=None, max_length=100_000)
    gold: dict[int, list[list[StrictIndex]]] | None = Field(
        default=None, description="Row index -> known ranking in response indices.")
    pairing: Literal["all", "adjacent"] = "all"


class TasksCreateOut(BaseModel):
    batch: str
    created: int
    task_ids: list[int] = Field(description="The tasks made by this request.")
    skipped_task_ids: list[int] = Field(
        default_factory=list, description="Tasks the batch already held for comparisons of "
        "these rows (or that an earlier row made): not made again.")


class Health(BaseModel):
    status: str
    database: str
