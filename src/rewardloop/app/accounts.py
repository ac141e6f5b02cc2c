"""Accounts: annotators and admins, their passwords (argon2id), bearer tokens and sessions.

Nothing secret is stored in the clear: passwords as argon2id hashes (OWASP parameters: 19 MiB,
2 iterations, parallelism 1), bearer tokens as SHA-256, session ids as HMAC-SHA-256 under the
server secret (so a copy of the database alone cannot mint a session).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import bindparam, delete, false, select, true, update
from sqlalchemy.orm import Session

from rewardloop.data.prepared import Driver, Prepared
from rewardloop.data.schema import (
    ROLES,
    Annotator,
    ApiToken,
    Assignment,
    AuditEvent,
    Setting,
    WebSession,
    utcnow,
)
from rewardloop.errors import UserError
from rewardloop.metrics import check_group_name

SECRET_KEY = "session_secret"  # noqa: S105 (the settings row name, not a secret)
SESSION_TTL = dt.timedelta(hours=12)
MIN_PASSWORD = 8
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32,
                         salt_len=16, type=Type.ID)
# Verified against when the user does not exist, so a login takes as long either way.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Principal:
    """Who is making a request, and how they proved it."""

    id: int
    name: str
    role: str
    via: str  # "session" or "token"
    csrf_token: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# The most common passwords of 8 or more characters in breach lists (NIST 800-63B asks to refuse
# those): the first ones tried against any login.
COMMON_PASSWORDS = frozenset({
    "password", "password1", "password123", "12345678", "123456789", "1234567890",
    "87654321", "11111111", "00000000", "qwertyui", "qwerty123", "qwertyuiop", "1q2w3e4r",
    "1qaz2wsx", "abcd1234", "abcdefgh", "iloveyou", "sunshine", "football", "baseball",
    "welcome1", "letmein1", "admin123", "administrator", "trustno1", "princess", "superman",
    "starwars", "whatever", "changeme", "passw0rd", "p@ssw0rd", "zaq12wsx", "asdfghjkl"})


def hash_password(password: str, name: str | None = None) -> str:
    """The stored hash of a new ``password`` (of user ``name``), refusing one shorter than
    MIN_PASSWORD, one of the most common, one character repeated, or one that contains the
    user name (of 4 or more characters; a shorter one only as the whole password)."""
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS or len(set(password)) == 1:
        raise UserError("that password is among the first any attacker tries; choose another "
                        "(a few unrelated words make a strong one)")
    # A short name ("ed") is inside many good passphrases: then only the name itself is out.
    if name and (lowered == name.lower() or (len(name) >= 4 and name.lower() in lowered)):
        raise UserError("a password may not contain the user name")
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def session_hash(secret: str, session_id: str) -> str:
    return hmac.new(secret.encode(), session_id.encode(), hashlib.sha256).hexdigest()


def server_secret(session: Session, env_value: str | None) -> str:
    """``$REWARDLOOP_SECRET`` if set, else the secret generated once and kept in ``settings``."""
    if env_value:
        if len(env_value) < 32:
            raise UserError("REWARDLOOP_SECRET must be at least 32 characters")
        return env_value
    row = session.get(Setting, SECRET_KEY)
    if row is None:
        row = Setting(key=SECRET_KEY, value=secrets.token_urlsafe(48))
        session.add(row)
        session.flush()
    return row.value


# -- users ------------------------------------------------------------------------------------


def get_user(session: Session, name: str) -> Annotator:
    user = session.scalar(select(Annotator).where(Annotator.name == name))
    if user is None:
        raise UserError(f"no user named {name!r}; `rewardloop users list` shows them")
    return user


def add_user(session: Session, name: str, role: str, *, password: str | None = None,
             groups: list[str] | None = None) -> Annotator:
    """Create a user; refuses a taken name, an unknown role, a short password and a group name
    that a reward mix (``--reward RUN@group=w,...``) could not name."""
    for group in groups or []:
        check_group_name(group)
    if role not in ROLES:
        raise UserError(f"role must be one of {list(ROLES)}, got {role!r}")
    if not name or len(name) > 120 or not name.isprintable() or name != name.strip():
        raise UserError("a user name needs 1 to 120 printable characters, no outer spaces")
    if session.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
        raise UserError(f"a user named {name!r} already exists")
    user = Annotator(name=name, role=role, groups=list(groups or []),
                     password_hash=(hash_password(password, name) if password is not None
                                    else None))
    session.add(user)
    session.flush()
    session.add(AuditEvent(actor_id=None, action="user.add",
                           payload={"user": name, "role": role, "groups": list(groups or [])}))
    return user


def deactivate_user(session: Session, name: str) -> Annotator:
    """Turn a user off: their sessions and tokens stop working at once, and the tasks they
    hold are handed back (their unexpired leases end now, freeing the slots for others)."""
    user = get_user(session, name)
    user.active = False
    revoke_credentials(session, user.id)
    session.execute(update(Assignment).where(
        Assignment.annotator_id == user.id, Assignment.completed == false(),
        Assignment.expires_at > utcnow()).values(expires_at=utcnow()))
    session.add(AuditEvent(action="user.deactivate", payload={"user": name}))
    return user


def revoke_credentials(session: Session, user_id: int) -> None:
    now = utcnow()
    session.execute(update(ApiToken).where(ApiToken.annotator_id == user_id,
                                           ApiToken.revoked_at.is_(None)).values(revoked_at=now))
    session.execute(update(WebSession).where(WebSession.annotator_id == user_id)
                    .values(revoked=True))


def new_token(session: Session, user: Annotator) -> str:
    """A fresh bearer token for ``user``; their earlier tokens are revoked. Shown once."""
    now = utcnow()
    session.execute(update(ApiToken).where(ApiToken.annotator_id == user.id,
                                           ApiToken.revoked_at.is_(None)).values(revoked_at=now))
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(annotator_id=user.id, token_hash=token_hash(token)))
    session.add(AuditEvent(action="user.token", payload={"user": user.name}))
    session.flush()
    return token


# -- authentication ---------------------------------------------------------------------------


_A, _TOK, _WS = Annotator.__table__, ApiToken.__table__, WebSession.__table__
# Every API request runs one of these, so they are prepared statements (see data.prepared).
_BY_TOKEN = Prepared(
    select(_A.c.id, _A.c.name, _A.c.role).join(_TOK, _TOK.c.annotator_id == _A.c.id)
    .where(_TOK.c.token_hash == bindparam("hash"), _TOK.c.revoked_at.is_(None),
           _A.c.active == true()))
_BY_SESSION = Prepared(
    select(_A.c.id, _A.c.name, _A.c.role, _WS.c.csrf_token)
    .join(_WS, _WS.c.annotator_id == _A.c.id)
    .where(_WS.c.session_hash == bindparam("hash"), _WS.c.revoked == false(),
           _WS.c.expires_at > bindparam("now"), _A.c.active == true()))


def principal_for_token(session: Session, token: str) -> Principal | None:
    row = _BY_TOKEN.first(Driver(session), {"hash": token_hash(token)})
    return Principal(row.id, row.name, row.role, "token") if row else None


def principal_for_session(session: Session, secret: str, session_id: str) -> Principal | None:
    row = _BY_SESSION.first(Driver(session),
                            {"hash": session_hash(secret, session_id), "now": utcnow()})
    if row is None:
        return None
    return Principal(row.id, row.name, row.role, "session", row.csrf_token)


def check_password(session: Session, name: str, password: str) -> int | None:
    """The id of the active user ``name`` if ``password`` is theirs (constant-ish time)."""
    user = session.scalar(select(Annotator).where(Annotator.name == name))
    ok = verify_password(user.password_hash if user else None, password)
    return user.id if user is not None and ok and user.active else None


def open_session(session: Session, secret: str, user_id: int,
                 addr: str | None = None) -> tuple[str, str]:
    """A new server-side session for ``user_id``: ``(session_id, csrf_token)``. Sessions that
    expired or were revoked are deleted here, so the table does not grow with every login."""
    now = utcnow()
    session.execute(delete(WebSession).where(
        (WebSession.expires_at <= now) | (WebSession.revoked == true())))
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(WebSession(session_hash=session_hash(secret, session_id), annotator_id=user_id,
                           csrf_token=csrf, expires_at=now + SESSION_TTL))
    session.add(AuditEvent(actor_id=user_id, action="session.login", payload={"addr": addr}))
    return session_id, csrf


def signed_in_from(session: Session, name: str, addr: str, last: int = 100) -> bool:
    """Whether user ``name`` signed in from ``addr`` in one of their ``last`` logins (the
    audit log keeps each login's address)."""
    user_id = session.scalar(select(Annotator.id).where(Annotator.name == name))
    if user_id is None:
        return False
    payloads = session.scalars(
        select(AuditEvent.payload).where(AuditEvent.actor_id == user_id,
                                         AuditEvent.action == "session.login")
        .order_by(AuditEvent.id.desc()).limit(last))
    return any(isinstance(p, dict) and p.get("addr") == addr for p in payloads)


def record_failed_login(session: Session, name: str, addr: str) -> None:
    """Audit a failed login. The name is kept only when it is a user's (a typed name that is
    no one's may be a password typed into the wrong field)."""
    user_id = session.scalar(select(Annotator.id).where(Annotator.name == name))
    session.add(AuditEvent(actor_id=user_id, action="session.login_failed",
                           payload={"user": name if user_id is not None else None,
                                    "addr": addr}))


def logout(session: Session, secret: str, session_id: str) -> None:
    """Revoke the session ``session_id`` and audit it (nothing happens for an unknown one)."""
    user_id = session.scalar(select(WebSession.annotator_id).where(
        WebSession.session_hash == session_hash(secret, session_id),
        WebSession.revoked == false()))
    if user_id is None:
        return
    session.execute(update(WebSession).where(
        WebSession.session_hash == session_hash(secret, session_id)).values(revoked=True))
    session.add(AuditEvent(actor_id=user_id, action="session.logout", payload={}))
