"""The image store from the command line.

    python -m app.images migrate --to s3://bucket/prefix [--from DIR] [--jobs 8]

`migrate` copies the images of a local image store (a directory: by default the configured
one, IMAGE_STORE_URL=file://… or DATA_DIR/images) into an S3-compatible bucket, reached with
the service's own AWS_* settings, as the service reaches it. An image that is there already
(the same key, the same size) is skipped: a run that was interrupted, or that ran while the
service went on making images, is finished by running the same command again. Temporary files
of saves in progress (`.incoming-*`), probe files (`.probe-*`) and anything else that is not an
image are left out.

A progress bar on a terminal; elsewhere a line every tenth of the way. Either way the last line
on stdout says how it went: `copied N, skipped M (already there), failed K`. Ctrl-C (or
SIGTERM) starts no more images and lets the uploads under way finish; a second one quits at
once (an upload cut short leaves no object behind).

Exit codes: 0 every image is in the target; 1 some images could not be copied (each is named
on stderr, with the reason); 2 a usage or settings problem; 3 the target store cannot be used
(unreachable, credentials refused, no such bucket); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from app.bootstrap import s3_image_store
from app.core.config import S3Location, Settings, parse_image_store_url, settings_or_exit
from app.core.logging import TextFormatter
from app.services.image_store import ImageNotFoundError, ImageStore, ImageStoreError, check_image_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STORE_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Images in flight at once: each is a HEAD (is it there?) and maybe an upload, which blocks
# a thread of the pool for its duration.
DEFAULT_JOBS = 8
MAX_JOBS = 64
PROG = "python -m app.images"
AWS_SETTINGS = "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION"


class UsageError(Exception):
    """A message for stderr; the command ends with EXIT_USAGE."""


# Settings and arguments ---------------------------------------------------------------------


def source_directory(given: str | None, settings: Settings) -> Path:
    """The local store to copy: --from (a path or a file:// URL), else the configured one."""
    if given is None:
        configured = settings.image_store_location
        if isinstance(configured, S3Location):
            raise UsageError(
                f"the configured image store is {configured.url}, not a local directory: "
                "name the directory to copy with --from"
            )
        directory = configured
    elif "://" in given:
        try:
            location = parse_image_store_url(given)
        except ValueError:
            raise UsageError(f"--from {given!r} is neither a directory nor a file:///absolute/path URL") from None
        if isinstance(location, S3Location):
            raise UsageError(f"--from must be a local directory (a path or file:///path), not {location.url}")
        directory = location
    else:
        directory = Path(given).expanduser().absolute()
    if not directory.is_dir():
        raise UsageError(f"the image store to copy, {directory}, is not a directory")
    return directory


def target_location(given: str) -> S3Location:
    try:
        location = parse_image_store_url(given)
    except ValueError:
        location = None
    if not isinstance(location, S3Location):
        raise UsageError(f"--to must be an S3 bucket, s3://bucket or s3://bucket/prefix, not {given!r}")
    return location


# The images to copy -------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceImage:
    key: str
    path: Path
    size: int


def _is_image_key(name: str) -> bool:
    try:
        check_image_key(name)
    except ImageNotFoundError:
        return False
    return True


def list_images(directory: Path) -> tuple[list[SourceImage], int]:
    """The images of a local store, in key order, and how many other entries it holds
    (temporary files of saves in progress, probe files, anything else)."""
    images: list[SourceImage] = []
    others = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (_is_image_key(entry.name) and entry.is_file()):
                others += 1
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # deleted since (the service's retention, say)
                continue
            images.append(SourceImage(entry.name, Path(entry.path), size))
    images.sort(key=lambda image: image.key)
    return images, others


# Copying ------------------------------------------------------------------------------------


@dataclass
class Tally:
    total: int
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    gone: int = 0  # deleted from the source after it was listed

    @property
    def finished(self) -> int:
        return self.copied + self.skipped + self.failed + self.gone

    def counts(self) -> str:
        gone = f", {self.gone} gone from the source meanwhile" if self.gone else ""
        return f"copied {self.copied}, skipped {self.skipped} (already there), failed {self.failed}{gone}"

    def summary(self, target: str, interrupted: bool = False, abandoned: int = 0) -> str:
        if interrupted:
            left = self.total - self.finished
            cut = f"; {abandoned} uploads under way abandoned" if abandoned else ""
            return f"Interrupted: {self.counts()}{cut}; {left} not done: run the same command again to go on."
        if self.failed:
            return f"Not all copied to {target}: {self.counts()}; the failed are named above: run again to retry them."
        return f"Copied to {target}: {self.counts()}."


# With no terminal, a line every tenth of the way, for a store of at least this many images.
PLAIN_PROGRESS_FROM = 50


class View:
    """A progress bar on a terminal (stderr); elsewhere a line every tenth of the way."""

    def __init__(self, total: int, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.total = total
        self._reported = 0
        self.progress = Progress(
            TextColumn("Copying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}", markup=False),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._task = self.progress.add_task("images", total=total, counts="")

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def advance(self, tally: Tally) -> None:
        self.progress.update(self._task, completed=tally.finished, counts=tally.counts())
        tenth = tally.finished * 10 // max(self.total, 1)
        plain = not self.live and self.total >= PLAIN_PROGRESS_FROM
        if plain and tenth > self._reported and tally.finished < self.total:
            self._reported = tenth
            self.say(f"{tally.finished}/{self.total} images: {tally.counts()}")

    def say(self, text: str) -> None:
        """A line above the bar (or on its own without one)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class ConsoleLogHandler(logging.Handler):
    """The service's log lines (a failed upload's details), above the progress bar."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


class Migration:
    """Copies the images, `jobs` at a time; `interrupt()` (a signal) stops it."""

    def __init__(self, images: list[SourceImage], target: ImageStore, target_url: str, jobs: int, view: View) -> None:
        self.images, self.target, self.target_url, self.jobs, self.view = images, target, target_url, jobs, view
        self.tally = Tally(len(images))
        self.copying = False  # false while the target is probed: nothing to wait for then
        self.stopping = False
        self.uploading = 0
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        self.copying = True
        slots = asyncio.Semaphore(self.jobs)
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="migrate") as pool:
            for image in self.images:
                await slots.acquire()
                if self.stopping:
                    break
                task = asyncio.create_task(self._migrate(image, pool))
                self._in_flight.add(task)
                task.add_done_callback(self._finished(slots))
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))

    def _finished(self, slots: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._in_flight.discard(task)
            slots.release()

        return done

    async def _migrate(self, image: SourceImage, pool: ThreadPoolExecutor) -> None:
        try:
            try:
                there: int | None = await self.target.size_of(image.key)
            except ImageNotFoundError:
                there = None
            if there == image.size:
                self.tally.skipped += 1
            elif self.stopping:
                return  # not started: left for the next run
            else:
                self.uploading += 1
                try:
                    await asyncio.get_running_loop().run_in_executor(pool, self._copy, image)
                finally:
                    self.uploading -= 1
                self.tally.copied += 1
        except FileNotFoundError:
            self.tally.gone += 1
            self.view.say(f"{image.key}: deleted from {image.path.parent} meanwhile: not copied")
        except ImageStoreError as exc:
            self._failed(image, str(exc))
        except OSError as exc:
            self._failed(image, f"It could not be read from {image.path.parent} ({_errno_name(exc)}).")
        except Exception as exc:  # of no known kind: still one image's failure, not the run's
            self._failed(image, f"{type(exc).__name__}: {exc}")
        self.view.advance(self.tally)

    def _copy(self, image: SourceImage) -> None:
        """On a thread of the pool: a save blocks."""
        self.target.save(image.key, image.path.read_bytes())

    def _failed(self, image: SourceImage, reason: str) -> None:
        self.tally.failed += 1
        self.view.say(f"{image.key}: failed: {reason}")

    def interrupt(self) -> None:
        """The first signal: start no more images, let those under way finish. The second,
        or one before copying has begun: quit at once."""
        if self.copying and not self.stopping:
            self.stopping = True
            self.view.say(
                f"Stopping: no more images are started; waiting for the {len(self._in_flight)} under way "
                "(Ctrl-C again quits at once; an upload cut short leaves no object)."
            )
            return
        self.view.stop()
        print(self.tally.summary(self.target_url, interrupted=True, abandoned=self.uploading))
        # Not an exception: the uploads under way hold threads that cannot be stopped, and the
        # store's client would finish them at exit, which is what this is meant to cut short.
        exit_now(EXIT_INTERRUPTED)


async def migrate(images: list[SourceImage], target: ImageStore, target_url: str, jobs: int, console: Console) -> int:
    migration = Migration(images, target, target_url, jobs, View(len(images), console))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, migration.interrupt)
    try:
        try:
            await target.probe()
        except ImageStoreError as exc:
            print(f"The target {target_url} cannot be used: {exc} (see {AWS_SETTINGS}).", file=sys.stderr)
            return EXIT_STORE_UNUSABLE
        migration.view.start()
        try:
            await migration.run()
        finally:
            migration.view.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await target.close()
    tally = migration.tally
    interrupted = migration.stopping and tally.finished < tally.total
    print(tally.summary(target_url, interrupted=interrupted), flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if tally.failed else EXIT_OK


# The command --------------------------------------------------------------------------------


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if not 1 <= jobs <= MAX_JOBS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_JOBS}")
    return jobs


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog=PROG, description="The image store of the service.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate_command = commands.add_parser(
        "migrate",
        help="copy a local image store into an S3 bucket",
        description=(
            "Copy the images of a local image store into an S3-compatible bucket, with the AWS_* settings. "
            "Images already there (same key, same size) are skipped: run it again to finish an interrupted run, "
            "or to copy the images made since."
        ),
    )
    migrate_command.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX", help="the bucket (and prefix)")
    migrate_command.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="the local store: a directory or file:///path (default: the configured IMAGE_STORE_URL)",
    )
    migrate_command.add_argument(
        "--jobs", type=_jobs, default=DEFAULT_JOBS, help=f"images in flight at once (default {DEFAULT_JOBS})"
    )
    return root


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        settings = settings_or_exit()
        try:
            source = source_directory(args.source, settings)
            location = target_location(args.to)
            images, others = list_images(source)
        except UsageError as exc:
            print(f"{PROG} migrate: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"{PROG} migrate: the image store to copy cannot be listed ({_errno_name(exc)})", file=sys.stderr)
            return EXIT_USAGE
        left_out = f"; left out: {others} entries that are not images (temporary files, probes, ...)" if others else ""
        size = decimal(sum(image.size for image in images))
        print(f"{len(images)} images ({size}) in {source}, to copy to {location.url}{left_out}.", flush=True)
        console = Console(stderr=True)
        logging.getLogger().addHandler(ConsoleLogHandler(console))
        return asyncio.run(migrate(images, s3_image_store(location, settings), location.url, args.jobs, console))
    except KeyboardInterrupt:  # before the copy's own handling of Ctrl-C is in place
        print("Interrupted: nothing copied.", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_now(code: int) -> NoReturn:
    """End the process once its output is out, without finalizing the interpreter: obstore
    (0.12) goes on for a moment on its own threads after an async request has failed, and a
    process that finalizes meanwhile aborts (SIGABRT) instead of exiting with its code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
