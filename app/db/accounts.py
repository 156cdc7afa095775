"""Queries and writes of accounts: users, their sign-in sessions and refresh tokens, and the
images they used per day. Each call is one transaction of its own."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.repository import ConflictingWriteError, as_utc
from app.db.tables import DailyUsageRow, RefreshTokenRow, SessionRow, UserRow


class Rotation(Enum):
    ROTATED = "rotated"
    REUSED = "reused"  # a token that was rotated already: its session is revoked now
    INVALID = "invalid"  # unknown, expired, or its session has ended


@dataclass(frozen=True)
class Rotated:
    outcome: Rotation
    session_id: str | None = None
    user_email: str | None = None


@dataclass(frozen=True)
class UserUsage:
    user: UserRow
    images_today: int


class AccountRepository:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    # Users ------------------------------------------------------------------------------

    async def seed_users(self, users: Iterable[UserRow]) -> None:
        """Insert the users that are missing; existing rows are left as they are."""
        async with self._sessionmaker.begin() as session:
            existing = set((await session.scalars(select(UserRow.email))).all())
            for user in users:
                if user.email not in existing:
                    session.add(user)

    async def get_user(self, email: str) -> UserRow | None:
        async with self._sessionmaker() as session:
            return await session.get(UserRow, email)

    async def add_user(self, user: UserRow) -> None:
        """Raise ConflictingWriteError when the email is taken."""
        try:
            async with self._sessionmaker.begin() as session:
                session.add(user)
        except IntegrityError as exc:
            raise ConflictingWriteError(str(exc)) from exc

    async def update_user(self, email: str, **values: Any) -> UserRow | None:
        """Set the columns `values` names; the user as it is now, or None if there is none."""
        async with self._sessionmaker.begin() as session:
            user = await session.get(UserRow, email, with_for_update=True)
            if user is None:
                return None
            for name, value in values.items():
                setattr(user, name, value)
        return user

    async def users_with_usage(
        self, day: date, limit: int, after_email: str | None = None, email: str | None = None
    ) -> list[UserUsage]:
        """Users by email, strictly after `after_email` (or just `email`), with the images they
        used on `day`."""
        query = (
            select(UserRow, DailyUsageRow.images)
            .outerjoin(DailyUsageRow, and_(DailyUsageRow.user_email == UserRow.email, DailyUsageRow.day == day))
            .order_by(UserRow.email)
            .limit(limit)
        )
        if after_email is not None:
            query = query.where(UserRow.email > after_email)
        if email is not None:
            query = query.where(UserRow.email == email)
        async with self._sessionmaker() as session:
            rows = (await session.execute(query)).all()
        return [UserUsage(user, images or 0) for user, images in rows]

    # Sessions ---------------------------------------------------------------------------

    async def start_session(self, session_row: SessionRow, token_hash: str) -> None:
        async with self._sessionmaker.begin() as session:
            session.add(session_row)
            await session.flush()
            session.add(
                RefreshTokenRow(token_hash=token_hash, session_id=session_row.id, expires_at=session_row.expires_at)
            )

    async def rotate(self, token_hash: str, new_hash: str, expires_at: datetime, now: datetime) -> Rotated:
        """Trade the refresh token for a new one, at most once: the token's row is locked, so
        that of two concurrent uses one rotates and the other is a reuse."""
        async with self._sessionmaker.begin() as session:
            token = await session.get(RefreshTokenRow, token_hash, with_for_update=True)
            if token is None:
                return Rotated(Rotation.INVALID)
            owner = await session.get(SessionRow, token.session_id, with_for_update=True)
            if owner is None or owner.revoked_at is not None:
                return Rotated(Rotation.INVALID)
            if token.rotated_at is not None:
                owner.revoked_at, owner.revoked_reason = now, "refresh token reused"
                return Rotated(Rotation.REUSED, owner.id, owner.user_email)
            if as_utc(token.expires_at) <= now:
                return Rotated(Rotation.INVALID)
            token.rotated_at = now
            owner.expires_at = expires_at
            # Rotated tokens are kept to catch their reuse while they could still have been used.
            await session.execute(
                delete(RefreshTokenRow)
                .where(RefreshTokenRow.session_id == owner.id, RefreshTokenRow.expires_at <= now)
                .execution_options(synchronize_session=False)
            )
            session.add(RefreshTokenRow(token_hash=new_hash, session_id=owner.id, expires_at=expires_at))
            return Rotated(Rotation.ROTATED, owner.id, owner.user_email)

    async def session_active(self, session_id: str, email: str) -> bool:
        async with self._sessionmaker() as session:
            found = await session.get(SessionRow, session_id)
        return found is not None and found.user_email == email and found.revoked_at is None

    async def end_session(self, session_id: str, reason: str, now: datetime) -> None:
        async with self._sessionmaker.begin() as session:
            await session.execute(
                update(SessionRow)
                .where(SessionRow.id == session_id, SessionRow.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
            )

    async def end_sessions_of(self, email: str, reason: str, now: datetime, keep: str | None = None) -> list[str]:
        """End the user's sessions but `keep`; the ids of those ended."""
        async with self._sessionmaker.begin() as session:
            return await _end_sessions(session, email, reason, now, keep)

    async def set_password(
        self, email: str, password_hash: str, now: datetime, keep_session: str | None
    ) -> list[str] | None:
        """The new hash, and every session of the user but `keep_session` ended, at once; the
        ended sessions' ids, or None if there is no such user."""
        async with self._sessionmaker.begin() as session:
            user = await session.get(UserRow, email, with_for_update=True)
            if user is None:
                return None
            user.password_hash = password_hash
            return await _end_sessions(session, email, "password changed", now, keep_session)


async def _end_sessions(session: AsyncSession, email: str, reason: str, now: datetime, keep: str | None) -> list[str]:
    query = select(SessionRow.id).where(SessionRow.user_email == email, SessionRow.revoked_at.is_(None))
    if keep is not None:
        query = query.where(SessionRow.id != keep)
    ended = list((await session.scalars(query)).all())
    if ended:
        await session.execute(
            update(SessionRow).where(SessionRow.id.in_(ended)).values(revoked_at=now, revoked_reason=reason)
        )
    return ended
