"""The preference data model: THE contract between collection, training and evaluation.

One set of tables holds everything from an annotator's click to the data a reward model trains
on. Constraints make bad states impossible rather than merely unlikely:

- a judgment is unique per (task, annotator) and per (annotator, idempotency key);
- a response belongs to one prompt, and a prompt/response text is stored once (content hash);
- a task lists 2..k responses of its own prompt, each at a fixed position;
- an assignment (lease) is unique per (task, annotator).

Rankings are stored as JSON lists of groups of response ids, best first; a group of two or more
ids is a tie, e.g. ``[[12], [10, 11]]`` means 12 beat both 10 and 11, which tie.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from rewardloop.data.values import content_hash, ranking_pairs, validate_ranking

ROLES = ("admin", "annotator")
TASK_KINDS = ("pairwise", "ranking")
SOURCES = ("human", "simulated", "import", "model")
AUDIENCE_MAX = 255
"""Longest group name a task can be aimed at (``ComparisonTask.audience``)."""

__all__ = ["content_hash", "ranking_pairs", "validate_ranking"]  # re-exported for callers


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Annotator(Base):
    """A person (or a simulated person) who judges; admins also manage the server."""

    __tablename__ = "annotators"
    __table_args__ = (CheckConstraint("role IN ('admin', 'annotator')", name="ck_annotator_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Groups and attributes the annotator consented to share (for fairness analysis only).
    groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "human", "simulated" or "import" (a name that arrived in an imported file).
    kind: Mapped[str] = mapped_column(String(16), default="human")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    judgments: Mapped[list[Judgment]] = relationship(back_populates="annotator")


class ApiToken(Base):
    """A bearer token for scripts; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A server-side login session; the cookie carries a random id whose hash is stored here."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Setting(Base):
    """Server-wide key/value settings (e.g. the generated session secret)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Prompt(Base):
    """A prompt: plain text or a list of chat messages ({role, content})."""

    __tablename__ = "prompts"
    __table_args__ = (
        CheckConstraint("text IS NOT NULL OR messages IS NOT NULL", name="ck_prompt_content"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(255), index=True)
    text: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    responses: Mapped[list[Response]] = relationship(back_populates="prompt")


class Response(Base):
    """An answer to a prompt: who wrote it (model, version) and how (generation settings)."""

    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("prompt_id", "content_hash", name="uq_response_content"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    # Chat-format answers (a list of assistant messages) are kept verbatim for lossless export.
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(255))
    gen_settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    prompt: Mapped[Prompt] = relationship(back_populates="responses")


class Batch(Base):
    """A named set of tasks created together (one `tasks create` or one loop round)."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    guidelines: Mapped[str | None] = mapped_column(Text)
    guideline_version: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tasks: Mapped[list[ComparisonTask]] = relationship(back_populates="batch")


class ComparisonTask(Base):
    """Compare or rank 2..k responses to one prompt, wanted from `overlap` distinct annotators.

    A gold task carries its known answer (``gold_ranking``) to check annotators against. A task
    with an ``audience`` (an annotator group) is handed only to annotators of that group, so new
    judgments can be aimed at a group that falls behind (``feedback.audience``); without one it
    goes to everyone.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint("kind IN ('pairwise', 'ranking')", name="ck_task_kind"),
        CheckConstraint("overlap >= 1", name="ck_task_overlap"),
        CheckConstraint("NOT is_gold OR gold_ranking IS NOT NULL", name="ck_task_gold_answer"),
        Index("ix_tasks_open", "batch_id", "done"),
        # next_task walks open tasks by (priority DESC, id): migration 0002.
        Index("ix_tasks_next", "done", text("priority DESC"), "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_ranking: Mapped[list[Any] | None] = mapped_column(JSON)
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    # The annotator group the task is for (migration 0005); NULL: anyone.
    audience: Mapped[str | None] = mapped_column(String(AUDIENCE_MAX))
    # Judgments received; `done` once it reaches `overlap` (kept in step by feedback.tasks).
    n_judgments: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    external_id: Mapped[str | None] = mapped_column(String(255), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    batch: Mapped[Batch | None] = relationship(back_populates="tasks")
    prompt: Mapped[Prompt] = relationship()
    items: Mapped[list[TaskItem]] = relationship(
        back_populates="task", order_by="TaskItem.position", cascade="all, delete-orphan"
    )
    judgments: Mapped[list[Judgment]] = relationship(back_populates="task")


class TaskItem(Base):
    """Response ``response_id`` is the ``position``-th candidate of a task (canonical order),
    written by ``model`` for this task. A response is stored once per prompt and text and keeps
    the model that first wrote it; the same text from another policy (an arena of a later
    round) is attributed here."""

    __tablename__ = "task_items"
    __table_args__ = (
        UniqueConstraint("task_id", "position", name="uq_task_item_position"),
        UniqueConstraint("task_id", "response_id", name="uq_task_item_response"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    # Migration 0007; NULL: the response's own model.
    model: Mapped[str | None] = mapped_column(String(255))

    task: Mapped[ComparisonTask] = relationship(back_populates="items")
    response: Mapped[Response] = relationship()


class Assignment(Base):
    """A lease: the task was handed to this annotator until ``expires_at``, in ``shown_order``,
    under the batch's guidelines of ``guideline_version`` (the judgment records that one, even
    if the guidelines change before it is submitted)."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_assignment"),
        Index("ix_assignments_annotator", "annotator_id", "completed"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    shown_order: Mapped[list[Any]] = mapped_column(JSON)
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    completed: Mapped[bool] = mapped_column(Boolean, default=False)
    guideline_version: Mapped[str | None] = mapped_column(String(64))


class Judgment(Base):
    """One annotator's ranking of one task's responses (ties allowed), plus how it was given."""

    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_judgment_task_annotator"),
        # Per annotator (migration 0004): nobody can take, and so block, another's keys.
        UniqueConstraint("annotator_id", "idempotency_key", name="uq_judgment_annotator_key"),
        CheckConstraint(
            "strength IS NULL OR strength IN ('slight', 'clear', 'strong')", name="ck_strength"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    # NULL only for imported judgments whose file did not say who judged.
    annotator_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotators.id", ondelete="SET NULL"), index=True
    )
    ranking: Mapped[list[Any]] = mapped_column(JSON)
    strength: Mapped[str | None] = mapped_column(String(16))
    # A numeric preference margin (imported `margin`, or a rating difference).
    margin: Mapped[float | None] = mapped_column(Float)
    rationale: Mapped[str | None] = mapped_column(Text)
    shown_order: Mapped[list[Any] | None] = mapped_column(JSON)
    time_ms: Mapped[int | None] = mapped_column(Integer)
    guideline_version: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16), default="human")
    external_id: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    task: Mapped[ComparisonTask] = relationship(back_populates="judgments")
    annotator: Mapped[Annotator | None] = relationship(back_populates="judgments")


class Rating(Base):
    """Unpaired feedback on one response: a thumbs up/down (KTO) and/or a numeric score."""

    __tablename__ = "ratings"
    __table_args__ = (
        CheckConstraint("label IS NOT NULL OR score IS NOT NULL", name="ck_rating_value"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    annotator_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotators.id", ondelete="SET NULL")
    )
    label: Mapped[bool | None] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    source: Mapped[str] = mapped_column(String(16), default="import")
    external_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    response: Mapped[Response] = relationship()


class AuditEvent(Base):
    """Append-only log of every state change to annotation data (who, what, when)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("annotators.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
