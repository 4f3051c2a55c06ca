"""S3-compatible stores: how the client is built from the settings (checksums, retries,
server-side encryption), and how errors are classified. Against moto over HTTP, and a
scripted fake S3 endpoint for the server errors moto does not make."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, ReadTimeoutError, ResponseStreamingError

from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.storage import StorageError, TransientStorageError, open_storage
from pixelrelay.pipeline.storage.s3 import S3Options, S3Storage, _map_error

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fake</RequestId></Error>"
)


class FakeS3:
    """An S3 endpoint on 127.0.0.1 that answers requests from a script: each scripted
    ``(status, code)`` once, as an S3 XML error, then 200 (GET: ``body``) for the rest."""

    def __init__(self, script: list[tuple[int, str]], body: bytes = b"payload") -> None:
        self.script, self.body, self.requests = list(script), body, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, dict(self.headers), payload))
                if fake.script:
                    status, code = fake.script.pop(0)
                    data = ERROR_XML.format(code=code, message="scripted").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                else:
                    data = fake.body if self.command == "GET" else b""
                    self.send_response(200)
                    self.send_header("ETag", '"0123456789abcdef"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake_s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    servers: list[FakeS3] = []

    def make(script, body=b"payload"):
        servers.append(FakeS3(script, body))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


# --- the client -----------------------------------------------------------------------------


def test_the_client_follows_the_settings(monkeypatch, s3_server):
    default = S3Storage.shared(settings=Settings.from_env())
    assert default.client.meta.config.request_checksum_calculation == "when_required"
    assert default.client.meta.config.response_checksum_validation == "when_required"
    assert default.client.meta.config.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert default.client.meta.endpoint_url == s3_server

    monkeypatch.setenv("PIXELRELAY_S3_CHECKSUMS", "when_supported")
    monkeypatch.setenv("PIXELRELAY_S3_RETRY_MODE", "adaptive")
    monkeypatch.setenv("PIXELRELAY_S3_MAX_ATTEMPTS", "6")
    for storage in (S3Storage.shared(settings=Settings.from_env()), open_storage("s3://b/k")):  # given, or the env's
        config = storage.client.meta.config
        assert config.request_checksum_calculation == config.response_checksum_validation == "when_supported"
        assert config.retries == {"total_max_attempts": 6, "mode": "adaptive"}
    assert open_storage("s3://b/k") is not default


@pytest.mark.parametrize(
    "env, bad",
    [
        ({"PIXELRELAY_S3_SSE_KMS_KEY_ID": "alias/k"}, "PIXELRELAY_S3_SSE_KMS_KEY_ID"),
        ({"PIXELRELAY_S3_SSE": "AES256", "PIXELRELAY_S3_SSE_KMS_KEY_ID": "alias/k"}, "PIXELRELAY_S3_SSE_KMS_KEY_ID"),
        ({"PIXELRELAY_S3_SSE": "aes256"}, "PIXELRELAY_S3_SSE"),
        ({"PIXELRELAY_S3_CHECKSUMS": "never"}, "PIXELRELAY_S3_CHECKSUMS"),
        ({"PIXELRELAY_S3_MAX_ATTEMPTS": "0"}, "PIXELRELAY_S3_MAX_ATTEMPTS"),
        ({"PIXELRELAY_S3_RETRY_MODE": "legacy"}, "PIXELRELAY_S3_RETRY_MODE"),
    ],
)
def test_bad_s3_settings_fail_fast_naming_the_setting(monkeypatch, env, bad):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{bad}:"):
        Settings.from_env()
    with pytest.raises(ConfigError, match=f"{bad}:"):
        open_storage("s3://bucket/key")  # a storage opened from the environment too


@pytest.mark.parametrize("checksums, sent", [("when_required", False), ("when_supported", True)])
@pytest.mark.slow
def test_checksums_are_sent_only_when_the_setting_says(fake_s3, checksums, sent):
    fake = fake_s3([])
    storage = S3Storage(options=S3Options(endpoint_url=fake.url, checksums=checksums))
    storage.put("s3://bucket/a.png", b"png bytes")
    method, _, headers, payload = fake.requests[0]
    names = {name.lower() for name in headers}
    assert method == "PUT"
    assert any(n.startswith("x-amz-checksum-") or n == "x-amz-sdk-checksum-algorithm" for n in names) is sent
    if not sent:  # the body as it is: no aws-chunked framing that S3-compatible stores reject
        assert payload == b"png bytes" and "aws-chunked" not in headers.get("Content-Encoding", "")


@pytest.mark.parametrize("checksums", ["when_required", "when_supported"])
def test_round_trip_against_moto_in_either_checksum_mode(s3_bucket, monkeypatch, checksums):
    monkeypatch.setenv("PIXELRELAY_S3_CHECKSUMS", checksums)
    storage = open_storage(f"s3://{s3_bucket}/")
    assert storage.client.meta.config.request_checksum_calculation == checksums
    storage.put(f"s3://{s3_bucket}/c/a.png", b"a" * 1000)
    storage.put_file(f"s3://{s3_bucket}/c/m.jsonl", io.BytesIO(b"{}\n" * 1000))
    assert storage.get(f"s3://{s3_bucket}/c/a.png") == b"a" * 1000
    assert storage.get(f"s3://{s3_bucket}/c/m.jsonl") == b"{}\n" * 1000


# --- server errors ----------------------------------------------------------------------------


def test_slowdown_that_persists_is_transient_after_botocores_retries(fake_s3):
    fake = fake_s3([(503, "SlowDown")] * 100)
    storage = S3Storage(options=S3Options(endpoint_url=fake.url, max_attempts=2))
    calls = [
        lambda: storage.get("s3://bucket/k.png"),
        lambda: storage.put_file("s3://bucket/k.jsonl", io.BytesIO(b"{}")),  # through s3transfer
        lambda: storage.exists("s3://bucket/k.png"),  # HEAD: a 503 without a body
    ]
    for i, call in enumerate(calls):
        with pytest.raises(TransientStorageError, match="503"):
            call()
        assert len(fake.requests) == 2 * (i + 1), i  # botocore retried once, then gave up


def test_server_errors_are_retried_by_botocore_and_then_succeed(fake_s3):
    fake = fake_s3([(500, "InternalError"), (502, "BadGateway")], body=b"restored pixels")
    storage = S3Storage(options=S3Options(endpoint_url=fake.url, max_attempts=3))
    assert storage.get("s3://bucket/k.png") == b"restored pixels"
    assert [r[0] for r in fake.requests] == ["GET"] * 3


def test_access_denied_is_permanent_and_not_retried(fake_s3):
    fake = fake_s3([(403, "AccessDenied")])
    storage = S3Storage(options=S3Options(endpoint_url=fake.url, max_attempts=3))
    with pytest.raises(StorageError, match="AccessDenied") as info:
        storage.get("s3://bucket/k.png")
    assert not isinstance(info.value, TransientStorageError)
    assert len(fake.requests) == 1


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    "status, code",
    [
        (500, "InternalError"),
        (502, ""),
        (503, "SlowDown"),
        (503, "ServiceUnavailable"),
        (503, "SlowDownWrite"),
        (504, ""),
        (400, "RequestTimeout"),
        (400, "ThrottlingException"),
        (429, "TooManyRequests"),
        (429, ""),
        (409, "OperationAborted"),
        (503, "503"),
    ],
)
def test_transient_error_classification(status, code):
    assert isinstance(_map_error(_client_error(status, code), "s3://b/k"), TransientStorageError)


@pytest.mark.parametrize(
    "status, code",
    [
        (403, "AccessDenied"),
        (404, "NoSuchBucket"),
        (400, "InvalidArgument"),
        (400, "InvalidRequest"),
        (301, "PermanentRedirect"),
    ],
)
def test_permanent_error_classification(status, code):
    mapped = _map_error(_client_error(status, code), "s3://b/k")
    assert isinstance(mapped, StorageError) and not isinstance(mapped, TransientStorageError)


def test_a_body_cut_short_or_timed_out_is_transient():
    for exc in (ResponseStreamingError(error="reset"), ReadTimeoutError(endpoint_url="http://x")):
        assert isinstance(_map_error(exc, "s3://b/k"), TransientStorageError)


# --- server-side encryption -------------------------------------------------------------------


def test_sse_aes256_is_applied_to_every_write(s3_bucket, s3_client, monkeypatch):
    monkeypatch.setenv("PIXELRELAY_S3_SSE", "AES256")
    storage = open_storage(f"s3://{s3_bucket}/", settings=Settings.from_env())
    storage.transfer = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    storage.put(f"s3://{s3_bucket}/e/a.png", b"png")
    storage.put_file(f"s3://{s3_bucket}/e/m.jsonl", io.BytesIO(b"{}\n"))
    storage.put_file(f"s3://{s3_bucket}/e/big.bin", io.BytesIO(b"z" * (6 << 20)))  # multipart
    for key in ("e/a.png", "e/m.jsonl", "e/big.bin"):
        assert s3_client.head_object(Bucket=s3_bucket, Key=key).get("ServerSideEncryption") == "AES256", key

    plain = open_storage(f"s3://{s3_bucket}/", settings=Settings.from_env(s3_sse=""))
    plain.put(f"s3://{s3_bucket}/e/plain.png", b"png")
    assert "ServerSideEncryption" not in s3_client.head_object(Bucket=s3_bucket, Key="e/plain.png")


def test_sse_kms_with_a_key_id(s3_bucket, s3_client):
    settings = Settings.from_env(s3_sse="aws:kms", s3_sse_kms_key_id="alias/pixelrelay-outputs")
    storage = open_storage(f"s3://{s3_bucket}/", settings=settings)
    storage.put(f"s3://{s3_bucket}/k/a.png", b"png")
    head = s3_client.head_object(Bucket=s3_bucket, Key="k/a.png")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"].endswith("alias/pixelrelay-outputs")
    assert storage.get(f"s3://{s3_bucket}/k/a.png") == b"png"
