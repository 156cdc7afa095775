"""`python -m bench.serve APP`: an ASGI app under the service's own server configuration
(app/core/http_server.py, as run.py starts it), with the settings of the environment; HOST and
PORT say where it listens."""

import argparse
import resource

import uvicorn

from app.core.config import settings_or_exit
from app.core.http_server import server_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", help="import string, e.g. main:app")
    parser.add_argument("--no-access-log", action="store_true", help="no line per request")
    parser.add_argument(
        "--open-file-limit", type=int, help="first lower this process's RLIMIT_NOFILE (soft and hard) to this"
    )
    args = parser.parse_args()
    if args.open_file_limit is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.open_file_limit, args.open_file_limit))
    settings = settings_or_exit()
    uvicorn.Server(server_config(args.app, settings, access_log=not args.no_access_log)).run()


if __name__ == "__main__":
    main()
