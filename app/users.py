"""Operators' command line for accounts, on the service's own database (DATABASE_URL):

    python -m app.users create EMAIL [--admin] [--full-name NAME] [--password-stdin]
    python -m app.users disable EMAIL
    python -m app.users enable EMAIL
    python -m app.users reset-password EMAIL [--password-stdin]

A password is asked for twice on the terminal, or read from the first line of standard input
with --password-stdin. Every action is logged with who did it (`cli:<login name>`). Exit
status: 0 done, 1 refused (no such user, email taken, weak password), 2 bad usage or settings.
"""

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable

from app.bootstrap import postgres_limits
from app.core.config import Settings, settings_or_exit
from app.core.logging import configure_logging
from app.db.accounts import AccountRepository
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_database
from app.services.auth_service import EmailTakenError
from app.services.errors import InvalidFieldError
from app.services.users_service import UserNotFoundError, UsersService

logger = logging.getLogger("myflix.admin")


class PasswordNotGivenError(Exception):
    pass


def operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container's numeric user, say)
        return "cli:unknown"


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise PasswordNotGivenError("no password on standard input")
        return line.rstrip("\r\n")
    password = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != password:
        raise PasswordNotGivenError("the two passwords differ")
    return password


async def run(settings: Settings, action: Callable[[UsersService], Awaitable[str]]) -> str:
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)  # where the SQLite default lives
    engine = create_engine(settings.database_url, postgres_limits(settings))
    try:
        await upgrade_database(engine)
        users = UsersService(AccountRepository(create_sessionmaker(engine)), settings.DAILY_IMAGE_QUOTA)
        return await action(users)
    finally:
        await engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.users", description="Manage MyFlix accounts.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create an account")
    create.add_argument("email")
    create.add_argument("--full-name", default="", help="shown in the app (default: the email's local part)")
    create.add_argument("--admin", action="store_true", help="with the admin role")
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    for name, text in (("disable", "disable an account and end its sessions"), ("enable", "enable an account")):
        command = commands.add_parser(name, help=text)
        command.add_argument("email")
    reset = commands.add_parser("reset-password", help="set a new password and end every session")
    reset.add_argument("email")
    reset.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    return parser


def action_for(args: argparse.Namespace, actor: str) -> Callable[[UsersService], Awaitable[str]]:
    email: str = args.email
    if args.command == "create":
        password = read_password(args.password_stdin)
        full_name = args.full_name or email.partition("@")[0]

        async def create(users: UsersService) -> str:
            user = await users.create_user(actor, email, password, full_name, admin=args.admin)
            return f"created {user.email} ({user.role})"

        return create
    if args.command == "reset-password":
        password = read_password(args.password_stdin)

        async def reset(users: UsersService) -> str:
            await users.reset_password(actor, email, password)
            return f"password of {email} reset; its sessions are ended"

        return reset
    disabled = args.command == "disable"

    async def switch(users: UsersService) -> str:
        updated = await users.update_user(actor, email, disabled=disabled)
        return f"{updated.user.email} {'disabled; its sessions are ended' if disabled else 'enabled'}"

    return switch


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_or_exit()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    try:
        action = action_for(args, operator())
        print(asyncio.run(run(settings, action)))
    except PasswordNotGivenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (UserNotFoundError, EmailTakenError, InvalidFieldError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
