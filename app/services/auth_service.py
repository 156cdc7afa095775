"""Who may sign in, their sessions, and the tokens that say so. Knows nothing of HTTP."""

import asyncio
import logging
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import email_validator
from cachetools import TTLCache

from app.core.security import (
    BCRYPT_MAX_PASSWORD_BYTES,
    InvalidTokenError,
    create_access_token,
    decode_access_token,
    hash_password,
    new_refresh_token,
    refresh_token_hash,
    verify_password,
)
from app.core.text import has_control_character
from app.db.accounts import AccountRepository, Rotation
from app.db.repository import ConflictingWriteError
from app.db.tables import SessionRow, UserRow
from app.services.errors import InvalidFieldError
from app.services.fair_turns import FairTurns, QueueFullError
from app.services.login_throttle import LoginThrottle, LoginThrottledError

logger = logging.getLogger("myflix.auth")


@dataclass(frozen=True)
class User:
    email: str
    full_name: str
    role: str = "user"
    disabled: bool = False
    # The user's own images per UTC day (0: unlimited); None: the service's default.
    daily_image_quota: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE


ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class UserRecord:
    user: User
    password_hash: str


@dataclass(frozen=True)
class SignedIn:
    """Who a request's access token speaks for, and in which session."""

    user: User
    session_id: str


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


class InvalidCredentialsError(Exception):
    """Unknown email or wrong password; deliberately the same error for both."""


class AccountDisabledError(Exception):
    def __init__(self) -> None:
        super().__init__("This account is disabled; ask an administrator.")


class SignUpDisabledError(Exception):
    def __init__(self) -> None:
        super().__init__("Sign-up is disabled on this service; ask an administrator for an account.")


class EmailTakenError(Exception):
    def __init__(self) -> None:
        super().__init__("An account with this email exists already.")


class InvalidRefreshTokenError(Exception):
    def __init__(self, message: str = "The refresh token is invalid or expired; sign in again.") -> None:
        super().__init__(message)


class WrongPasswordError(Exception):
    def __init__(self) -> None:
        super().__init__("The current password is incorrect.")


class TooManySignInsAtOnceError(LoginThrottledError):
    message = "Too many sign-ins from this client at once; try again shortly."


class PasswordTooLongError(InvalidFieldError):
    location = ("body", "password")

    def __init__(self) -> None:
        super().__init__(f"password must be at most {BCRYPT_MAX_PASSWORD_BYTES} bytes (UTF-8)")


class WeakPasswordError(InvalidFieldError):
    def __init__(self, message: str, field: str = "password") -> None:
        super().__init__(message)
        self.location = ("body", field)


class InvalidEmailError(InvalidFieldError):
    location = ("body", "email")


MIN_PASSWORD_BYTES = 8


def check_new_password(password: str, email: str, field: str = "password") -> None:
    """A password an account may have: 8 to 72 bytes in UTF-8 (bcrypt reads no more), and not
    the account's email."""
    size = len(password.encode("utf-8", "surrogatepass"))
    if not MIN_PASSWORD_BYTES <= size <= BCRYPT_MAX_PASSWORD_BYTES:
        raise WeakPasswordError(
            f"{field} must be {MIN_PASSWORD_BYTES} to {BCRYPT_MAX_PASSWORD_BYTES} bytes long (UTF-8)", field
        )
    if normalize_email(password) == normalize_email(email):
        raise WeakPasswordError(f"{field} must not be the email address", field)


def valid_email(email: str) -> str:
    """The email, normalised (surrounding space, case); InvalidEmailError if it is not one."""
    normalized = normalize_email(email)
    try:
        email_validator.validate_email(normalized, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise InvalidEmailError(f"email is not a valid address: {exc}") from None
    return normalized


def _demo(email: str, full_name: str, password_hash: str) -> UserRecord:
    return UserRecord(User(email, full_name), password_hash)


# Seeded into the users table at start where SEED_DEMO_USERS says so (in development by
# default). Passwords (in the README): alice-wonderland, bob-builder.
DEMO_USERS: tuple[UserRecord, ...] = (
    _demo(
        "alice@myflix.dev",
        "Alice Liddell",
        "$2b$12$BF1eK8J0QozZDs7NeJarAOL4dkK4cjIdfu0XNEn8vnz9tg1czb0XO",
    ),
    _demo(
        "bob@myflix.dev",
        "Bob Builder",
        "$2b$12$P5quqE2LEDXsCYS9iJbezelikk0It0z21CzZaN.06DvwiCT5zR1I.",
    ),
)

# Verified against for unknown emails, so that they cost what a wrong password costs.
_DUMMY_HASH = "$2b$12$149OctSjYyZSdxO7E2PeruJ9Bnqr.EGFd3GVKcvozAI8lD4P5tJe."


def normalize_email(email: str) -> str:
    return email.strip().lower()


# How long a process trusts what it read of a user or a session: a logout, a disabled user
# or a revoked session elsewhere takes effect here within this, and at once where it happened.
ACCOUNT_CACHE_SECONDS = 15.0
ACCOUNT_CACHE_SIZE = 10_000


async def seed_demo_users(accounts: AccountRepository) -> None:
    await accounts.seed_users(
        UserRow(
            email=r.user.email,
            full_name=r.user.full_name,
            password_hash=r.password_hash,
            created_at=datetime.now(UTC),
        )
        for r in DEMO_USERS
    )


def user_of(row: UserRow) -> User:
    return User(row.email, row.full_name, row.role, row.disabled, row.daily_image_quota)


def _yield_to_the_event_loop() -> None:
    """Run this thread at a lower priority (Linux: per thread), so that a burst of logins,
    which keeps every core busy, does not make the event loop wait for a core."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


# A client's sign-ins waiting for bcrypt, at most; more are refused at once (429) instead of
# holding their connections, which others need, for seconds each.
SIGN_INS_QUEUED_PER_CLIENT = 32


class AuthService:
    def __init__(
        self,
        accounts: AccountRepository,
        jwt_secret: str,
        token_lifetime: timedelta,
        refresh_lifetime: timedelta,
        throttle: LoginThrottle,
        signup_enabled: bool,
        cache_seconds: float = ACCOUNT_CACHE_SECONDS,
    ) -> None:
        self._accounts = accounts
        self._throttle = throttle
        self._jwt_secret = jwt_secret
        self._token_lifetime = token_lifetime
        self._refresh_lifetime = refresh_lifetime
        self.signup_enabled = signup_enabled
        self._users: TTLCache[str, UserRecord | None] = TTLCache(maxsize=ACCOUNT_CACHE_SIZE, ttl=cache_seconds)
        self._sessions: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=ACCOUNT_CACHE_SIZE, ttl=cache_seconds)
        # One thread more than cores, and one client holds a core less than there are (one at
        # least): a client's flood (unknown emails, each checked against the dummy hash) leaves
        # the others a core, and however many clients flood, the next client's check starts at
        # once on the spare thread instead of waiting for theirs to end. Known and unknown emails
        # take the same turns, so their timing stays the same.
        cores = os.cpu_count() or 1
        self._hashing = ThreadPoolExecutor(
            max_workers=cores + 1, thread_name_prefix="bcrypt", initializer=_yield_to_the_event_loop
        )
        self._hashing_turns = FairTurns(
            slots=cores + 1, per_key=max(1, cores - 1), queue_per_key=SIGN_INS_QUEUED_PER_CLIENT
        )

    # Signing in ---------------------------------------------------------------------------

    async def login(self, email: str, password: str, client: str) -> IssuedTokens:
        """`client` identifies the caller (its address) for throttling and for fair turns at bcrypt."""
        if len(password.encode("utf-8", "surrogatepass")) > BCRYPT_MAX_PASSWORD_BYTES:
            raise PasswordTooLongError
        record = await self._check_password(normalize_email(email), password, client, InvalidCredentialsError)
        if record.user.disabled:
            raise AccountDisabledError
        return await self._start_session(record.user.email)

    async def register(self, email: str, password: str, full_name: str, client: str) -> IssuedTokens:
        if not self.signup_enabled:
            raise SignUpDisabledError
        account = valid_email(email)
        check_new_password(password, account)
        password_hash = await self._bcrypt(client, hash_password, password)
        row = UserRow(
            email=account, full_name=full_name.strip(), password_hash=password_hash, created_at=datetime.now(UTC)
        )
        try:
            await self._accounts.add_user(row)
        except ConflictingWriteError:
            raise EmailTakenError from None
        self._users.pop(account, None)
        logger.info("user registered", extra={"user": account})
        return await self._start_session(account)

    async def refresh(self, refresh_token: str) -> IssuedTokens:
        """New tokens for a refresh token, which is used up; one used before ends its session."""
        now = datetime.now(UTC)
        token, token_hash = new_refresh_token()
        rotated = await self._accounts.rotate(
            refresh_token_hash(refresh_token), token_hash, now + self._refresh_lifetime, now
        )
        if rotated.outcome is Rotation.REUSED:
            assert rotated.session_id is not None and rotated.user_email is not None
            self._sessions.pop((rotated.session_id, rotated.user_email), None)
            logger.warning(
                "a refresh token was used twice: its session is ended",
                extra={"user": rotated.user_email, "session": rotated.session_id},
            )
            raise InvalidRefreshTokenError("The refresh token was used already; the session is ended, sign in again.")
        if rotated.outcome is Rotation.INVALID:
            raise InvalidRefreshTokenError
        assert rotated.session_id is not None and rotated.user_email is not None
        record = await self._find_user(rotated.user_email)
        if record is None or record.user.disabled:
            await self._accounts.end_session(rotated.session_id, "user disabled", now)
            raise InvalidRefreshTokenError
        return self._tokens(rotated.user_email, rotated.session_id, token)

    async def logout(self, signed_in: SignedIn) -> None:
        await self._accounts.end_session(signed_in.session_id, "logged out", datetime.now(UTC))
        self._sessions.pop((signed_in.session_id, signed_in.user.email), None)

    async def change_password(self, signed_in: SignedIn, current: str, new: str, client: str) -> None:
        """Check the current password (throttled like a login), set the new one, and end the
        user's other sessions."""
        email = signed_in.user.email
        if len(current.encode("utf-8", "surrogatepass")) > BCRYPT_MAX_PASSWORD_BYTES:
            raise WrongPasswordError
        check_new_password(new, email, "new_password")
        await self._check_password(email, current, client, WrongPasswordError)
        password_hash = await self._bcrypt(client, hash_password, new)
        ended = await self._accounts.set_password(email, password_hash, datetime.now(UTC), signed_in.session_id)
        self.forget(email, ended or [])
        logger.info("password changed", extra={"user": email, "sessions_ended": len(ended or [])})

    # Checking tokens ----------------------------------------------------------------------

    async def signed_in(self, token: str) -> SignedIn:
        """Raise InvalidTokenError unless the token is valid, its session has not ended and its
        user is known and enabled."""
        email, session_id = decode_access_token(token, self._jwt_secret)
        record = await self._find_user(email)
        if record is None or record.user.disabled:
            raise InvalidTokenError("unknown or disabled subject")
        if not await self._session_active(session_id, email):
            raise InvalidTokenError("the session has ended")
        return SignedIn(record.user, session_id)

    def forget(self, email: str, session_ids: list[str]) -> None:
        """What this process remembers of the user and of those sessions of theirs is stale
        (they changed here): it is read again."""
        self._users.pop(email, None)
        for session_id in session_ids:
            self._sessions.pop((session_id, email), None)

    # Internals ----------------------------------------------------------------------------

    async def _find_user(self, email: str, fresh: bool = False) -> UserRecord | None:
        """The user, remembered for a while: every request checks its token's user, and a
        database round trip per request costs more than the rest of it. `fresh`: read now."""
        if not fresh:
            try:
                return self._users[email]
            except KeyError:  # never looked up, or expired
                pass
        row = await self._accounts.get_user(email)
        record = None if row is None else UserRecord(user_of(row), row.password_hash)
        self._users[email] = record
        return record

    async def _session_active(self, session_id: str, email: str) -> bool:
        key = (session_id, email)
        try:
            return self._sessions[key]
        except KeyError:
            pass
        active = self._sessions[key] = await self._accounts.session_active(session_id, email)
        return active

    async def _start_session(self, email: str) -> IssuedTokens:
        now = datetime.now(UTC)
        session_id = f"ses_{secrets.token_hex(16)}"
        token, token_hash = new_refresh_token()
        session = SessionRow(id=session_id, user_email=email, created_at=now, expires_at=now + self._refresh_lifetime)
        await self._accounts.start_session(session, token_hash)
        self._sessions[(session_id, email)] = True
        return self._tokens(email, session_id, token)

    def _tokens(self, email: str, session_id: str, refresh_token: str) -> IssuedTokens:
        access = create_access_token(email, session_id, self._jwt_secret, self._token_lifetime)
        return IssuedTokens(
            access,
            int(self._token_lifetime.total_seconds()),
            refresh_token,
            int(self._refresh_lifetime.total_seconds()),
        )

    async def _check_password(self, account: str, password: str, client: str, wrong: type[Exception]) -> UserRecord:
        """The account, once the password matched; else `wrong` is raised. Throttled per account
        and client, and each client takes turns at bcrypt."""
        # Counted as failed before the password is checked: concurrent guesses cannot all pass.
        attempt = await self._throttle.enter(account, client)
        try:
            # The turn comes before the user's lookup too: a flood's lookups would queue ahead
            # of everyone's at the database.
            await self._hashing_turns.acquire(client)
        except QueueFullError:
            await attempt.withdraw()
            raise TooManySignInsAtOnceError(retry_after=1) from None
        except BaseException:
            await attempt.withdraw()
            raise
        try:
            # No account has a control character (PostgreSQL would refuse a NUL): an unknown
            # email. Read afresh: a sign-in must see a user disabled a moment ago.
            record = None if has_control_character(account) else await self._find_user(account, fresh=True)
            password_hash = record.password_hash if record else _DUMMY_HASH
            # bcrypt takes a fifth of a second of CPU: keep it off the event loop.
            checking = asyncio.get_running_loop().run_in_executor(
                self._hashing, verify_password, password, password_hash
            )
        except BaseException:
            self._hashing_turns.release(client)
            await attempt.withdraw()
            raise
        # The turn is held until the check ends, even if this request is canceled meanwhile.
        checking.add_done_callback(lambda _: self._hashing_turns.release(client))
        matches = await asyncio.shield(checking)
        if record is None or not matches:
            raise wrong
        await attempt.succeeded()
        return record

    async def _bcrypt(self, client: str, work: Callable[[str], str], password: str) -> str:
        """`work(password)` on the hashing threads, in the client's turn."""
        try:
            await self._hashing_turns.acquire(client)
        except QueueFullError:
            raise TooManySignInsAtOnceError(retry_after=1) from None
        hashing = asyncio.get_running_loop().run_in_executor(self._hashing, work, password)
        hashing.add_done_callback(lambda _: self._hashing_turns.release(client))
        return await asyncio.shield(hashing)
