"""The `s3` store: one bucket of MinIO or any S3-compatible server, through the minio SDK.

Transient failures (connection refused, resets, 5xx) are retried with backoff for settings.retry_s; a
refused credential or a missing object fails at once with a message that names the cause.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from services.settings import StoreSettings
from services.stores.base import ObjectNotFound, StoreAccessDenied, StoreError, StoreUnavailable, check_key

logger = logging.getLogger(__name__)
T = TypeVar("T")

_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_MISSING = {"NoSuchKey", "NoSuchObject"}
_TRANSIENT_HTTP = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class S3Store:
    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, secure: bool = False,
                 region: str | None = None, retry_s: float = 60.0):
        # The SDK's own retries would hide the error type; ours know which errors are worth retrying.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=60.0), retries=False, maxsize=8)
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                            http_client=http)
        self.bucket, self.retry_s = bucket, retry_s
        self.description = f"S3 store s3://{bucket} at {'https' if secure else 'http'}://{endpoint}"
        self._bucket_checked = False

    def put_file(self, key: str, path: Path) -> None:
        self._call(key, lambda: self.client.fput_object(self.bucket, check_key(key), str(path)), writes=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, lambda: self.client.put_object(self.bucket, check_key(key), io.BytesIO(data), len(data)),
                   writes=True)

    def get_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call(key, lambda: self.client.fget_object(self.bucket, check_key(key), str(path)))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, check_key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return self._call(key, read)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, lambda: self.client.stat_object(self.bucket, check_key(key)))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            try:
                return sorted(item.object_name for item in
                              self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
            except S3Error as error:
                if error.code == "NoSuchBucket":
                    return []
                raise
        return self._call(prefix or "(all keys)", listing)

    def delete(self, key: str) -> None:
        self._call(key, lambda: self.client.remove_object(self.bucket, check_key(key)))

    def _ensure_bucket(self) -> None:
        if not self._bucket_checked:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
            self._bucket_checked = True

    def _call(self, key: str, operation: Callable[[], T], writes: bool = False) -> T:
        deadline, delay = time.monotonic() + self.retry_s, 0.25
        while True:
            try:
                if writes:
                    self._ensure_bucket()
                return operation()
            except S3Error as error:
                if error.code in _MISSING or (error.code == "NoSuchBucket" and not writes):
                    raise ObjectNotFound(f"{key} not found in the {self.description} ({error.code})") from None
                if error.code in _DENIED:
                    raise StoreAccessDenied(
                        f"the {self.description} refused the credentials ({error.code}) on {key}: check "
                        "GENIE_STORE_S3_ACCESS_KEY / GENIE_STORE_S3_SECRET_KEY or the credentials file") from None
                if not error.code.startswith(("Internal", "SlowDown", "ServiceUnavailable")):
                    raise StoreError(f"the {self.description} failed on {key}: {error.code}: {error.message}") from None
                cause: Exception = error
            except (ServerError, InvalidResponseError, *_TRANSIENT_HTTP) as error:
                status = getattr(error, "status_code", None) or getattr(error, "_status_code", None)
                if isinstance(error, ServerError) and status in (401, 403):
                    raise StoreAccessDenied(f"the {self.description} refused the request on {key} "
                                            f"(HTTP {status}): check the S3 credentials") from None
                cause = error
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"the {self.description} is unreachable or failing ({type(cause).__name__}: "
                    f"{_short(cause)}) on {key}; gave up after retrying for {self.retry_s:.0f} s") from None
            logger.warning("store call on %s failed (%s); retrying in %.2f s", key, type(cause).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) < 200 else text[:200] + "..."


def credentials(settings: StoreSettings) -> tuple[str, str]:
    """The S3 key pair from the environment settings or the secret file; never logged."""
    access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    if settings.s3_credentials_file is not None:
        try:
            stored = json.loads(Path(settings.s3_credentials_file).read_text(encoding="utf-8"))
            access, secret = access or stored["access_key"], secret or stored["secret_key"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StoreError(f"S3 credentials file {settings.s3_credentials_file} is unreadable: expected JSON "
                             f'{{"access_key": ..., "secret_key": ...}} ({type(error).__name__})') from None
    if not access or not secret:
        raise StoreError("the s3 store needs credentials: set GENIE_STORE_S3_ACCESS_KEY and "
                         "GENIE_STORE_S3_SECRET_KEY, or GENIE_STORE_S3_CREDENTIALS_FILE")
    return access, secret


def from_settings(settings: StoreSettings) -> S3Store:
    access, secret = credentials(settings)
    return S3Store(settings.s3_endpoint, settings.s3_bucket, access, secret, settings.s3_secure,
                   settings.s3_region, settings.retry_s)
