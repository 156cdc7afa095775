"""Password hashing (passlib API, bcrypt) and access tokens (JWT HS256 via python-jose)."""

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime, timedelta

from jose import JWTError, jwt
from passlib.context import CryptContext

JWT_ALGORITHM = "HS256"
# bcrypt only reads the first 72 bytes; a longer password would silently match its prefix.
BCRYPT_MAX_PASSWORD_BYTES = 72

_password_context = CryptContext(schemes=["bcrypt"], deprecated="auto")


class InvalidTokenError(Exception):
    """The token is malformed, forged, expired or of the wrong algorithm."""


def hash_password(password: str) -> str:
    return _password_context.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return _password_context.verify(password, password_hash)
    except ValueError:  # e.g. a NUL byte, which bcrypt refuses: it cannot be anyone's password
        return False


def create_access_token(subject: str, session_id: str, secret: str, expires_in: timedelta) -> str:
    now = datetime.now(UTC)
    # A token id, so that no two tokens are the same, even made within one second.
    claims = {"sub": subject, "sid": session_id, "jti": secrets.token_hex(8), "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def decode_access_token(token: str, secret: str) -> tuple[str, str]:
    """Return the token's subject and session; raise InvalidTokenError for anything not ours
    and current."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            options={"require_exp": True, "require_sub": True},
        )
    except (JWTError, ValueError, OverflowError, TypeError) as exc:  # e.g. "exp": 1e999
        raise InvalidTokenError(str(exc)) from exc
    subject, session_id = claims.get("sub"), claims.get("sid")
    if not isinstance(subject, str) or not subject:
        raise InvalidTokenError("token has no subject")
    if not isinstance(session_id, str) or not session_id:
        raise InvalidTokenError("token has no session")  # made before sessions could end
    return subject, session_id


def new_refresh_token() -> tuple[str, str]:
    """An opaque refresh token and the hash it is stored as (it has 256 random bits: a plain
    SHA-256 is enough, nobody can guess one to match a leaked hash)."""
    token = secrets.token_urlsafe(32)
    return token, refresh_token_hash(token)


def refresh_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# The longest a link's expiry is rounded up by.
MAX_LINK_WINDOW_SECONDS = 3600


class InvalidImageSignatureError(Exception):
    """The image link was tampered with or has expired."""


class ImageUrlSigner:
    """Signed, expiring image links: an <img src> cannot send a token, the link is the token.

    A link is signed when it is sent, and its expiry is rounded up to a fixed window, so the
    same image has the same URL for that long: browsers cache it, and two snapshots a few
    seconds apart agree. A link lives between `ttl_seconds` and that plus the window."""

    def __init__(self, secret: bytes, ttl_seconds: int) -> None:
        self._secret = secret
        self._ttl_seconds = ttl_seconds
        self.window_seconds = min(MAX_LINK_WINDOW_SECONDS, max(1, ttl_seconds // 10))

    def expires(self, now: float | None = None) -> int:
        """The expiry of a link signed now."""
        moment = int(time.time() if now is None else now)
        return (moment // self.window_seconds + 1) * self.window_seconds + self._ttl_seconds

    def query(self, key: str, expires: int) -> str:
        # Both values are URL-safe already (digits, hex): no encoding to pay for on every link.
        return f"expires={expires}&signature={self._signature(key, expires)}"

    def verify(self, key: str, expires: int, signature: str, now: float | None = None) -> int:
        """Return the seconds the link has left; raise InvalidImageSignatureError if none."""
        # A signature is hex; anything else (non-ASCII, say) is simply not one of ours.
        if not signature.isascii() or not hmac.compare_digest(self._signature(key, expires), signature):
            raise InvalidImageSignatureError("invalid image signature")
        remaining = expires - int(time.time() if now is None else now)
        if remaining <= 0:
            raise InvalidImageSignatureError("image link expired")
        return remaining

    def _signature(self, key: str, expires: int) -> str:
        return hmac.digest(self._secret, f"{key}\n{expires}".encode(), "sha256").hex()


def derive_key(secret: str, purpose: str) -> bytes:
    """A separate key per purpose from one configured secret."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()
