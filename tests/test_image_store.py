"""The image store's contract, on a local directory and on a real S3-compatible server."""

import asyncio
import logging
import uuid

import httpx
import pytest

from app.bootstrap import image_store_for, open_image_store
from app.core.config import S3Location
from app.services.image_store import ImageNotFoundError, ImageStoreError, LocalImageStore, possible_image_keys
from app.services.image_store_s3 import S3ImageStore
from tests.conftest import make_settings
from tests.s3_server import ACCESS_KEY, BUCKET, SECRET_KEY

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


def _s3_store(s3, secret: str = SECRET_KEY, bucket: str = BUCKET) -> S3ImageStore:
    location = S3Location(bucket, f"contract-{uuid.uuid4().hex[:8]}")
    return S3ImageStore(location, s3.endpoint, ACCESS_KEY, secret, "us-east-1")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalImageStore(tmp_path / "images")
    return _s3_store(request.getfixturevalue("s3"))


async def _read(store, key, byte_range=None) -> tuple[bytes, tuple[int, int, int]]:
    content = await store.read(key, byte_range)
    return b"".join([chunk async for chunk in content.chunks]), (content.size, content.start, content.end)


def test_an_image_saved_is_read_whole_or_in_part_and_deleted(store):
    async def scenario() -> None:
        await store.probe()
        store.save("job_a-0.png", PNG)
        assert await store.size_of("job_a-0.png") == len(PNG)
        assert await _read(store, "job_a-0.png") == (PNG, (len(PNG), 0, len(PNG)))
        assert await _read(store, "job_a-0.png", (10, 20)) == (PNG[10:20], (len(PNG), 10, 20))
        with pytest.raises(ImageNotFoundError):
            await store.size_of("job_a-1.png")
        with pytest.raises(ImageNotFoundError):
            await store.read("job_a-1.png")
        # Keys that name no image (a path, a probe object) are not found, whatever is there.
        for key in ("../job_a-0.png", "_probe/x", "job_a-0.txt"):
            with pytest.raises(ImageNotFoundError):
                await store.read(key)
        await store.delete(possible_image_keys("job_a", 2))  # absent ones are no error
        with pytest.raises(ImageNotFoundError):
            await store.size_of("job_a-0.png")

    asyncio.run(scenario())


def test_a_local_store_that_cannot_be_written_fails_its_probe(tmp_path):
    store = LocalImageStore(tmp_path / "images")
    (tmp_path / "images").rmdir()
    with pytest.raises(ImageStoreError, match=r"^not writable \(ENOENT\)$"):
        asyncio.run(store.probe())


def test_an_s3_store_that_refuses_the_credentials_fails_its_probe_in_words_of_our_own(s3):
    with pytest.raises(ImageStoreError) as refused:
        asyncio.run(_s3_store(s3, secret="not-the-secret").probe())
    assert str(refused.value) == "not writable: the store refused the credentials"
    assert s3.endpoint not in str(refused.value)


def test_a_saved_image_that_the_store_refuses_fails_with_a_reason(s3):
    with pytest.raises(ImageStoreError, match="could not be kept: the store refused the credentials"):
        _s3_store(s3, secret="not-the-secret").save("job_b-0.png", PNG)


def test_a_presigned_url_serves_the_image_without_credentials_until_it_expires(s3):
    store = _s3_store(s3)
    store.save("job_c-0.png", PNG)
    served = httpx.get(store.presigned_url("job_c-0.png", 60))
    assert served.status_code == 200
    assert served.content == PNG
    assert served.headers["content-type"] == "image/png"
    assert "immutable" in served.headers["cache-control"]
    # The same URL with its signature altered is refused.
    tampered = store.presigned_url("job_c-0.png", 60).replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered).status_code == 403


def test_the_store_is_chosen_by_image_store_url_and_the_old_setting_still_works(tmp_path, s3):
    assert isinstance(image_store_for(make_settings(tmp_path)), LocalImageStore)
    old = make_settings(tmp_path, IMAGE_STORE_DIR=tmp_path / "old-images")
    assert old.image_store_location == tmp_path / "old-images"
    url = make_settings(tmp_path, IMAGE_STORE_URL=f"file://{tmp_path}/new-images")
    assert url.image_store_location == tmp_path / "new-images"
    on_s3 = make_settings(tmp_path, **s3.env("chosen"))
    assert on_s3.image_store_location == S3Location(BUCKET, "chosen")
    assert isinstance(image_store_for(on_s3), S3ImageStore)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("images", "must start with file:// or s3://"),
        ("s3://", "is not s3://bucket"),
        ("s3://Bad_Bucket/x", "is not s3://bucket"),
        ("file://host/images", "is not a file:///absolute/path"),
    ],
)
def test_an_image_store_url_that_names_no_store_is_refused_at_start(tmp_path, url, reason):
    with pytest.raises(ValueError, match=reason):
        make_settings(tmp_path, IMAGE_STORE_URL=url)


def test_presigned_links_need_an_s3_store(tmp_path):
    with pytest.raises(ValueError, match="IMAGE_LINKS=presigned needs an s3://"):
        make_settings(tmp_path, IMAGE_LINKS="presigned")


def test_a_process_refuses_to_start_on_a_store_it_cannot_write(tmp_path, s3):
    settings = make_settings(tmp_path, **{**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(Exception, match="is not writable: the store refused the credentials"):
        asyncio.run(open_image_store(settings))


def test_a_local_store_of_a_scaled_out_process_is_warned_about(tmp_path, caplog):
    settings = make_settings(
        tmp_path,
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        IMAGE_STORE_DIR=tmp_path / "images",
    )
    with caplog.at_level(logging.WARNING, logger="myflix"):
        asyncio.run(open_image_store(settings))
    messages = [record.getMessage() for record in caplog.records]
    assert any("IMAGE_STORE_DIR is deprecated" in message for message in messages), messages
    assert any("replicas on other machines will not see its images" in message for message in messages), messages
