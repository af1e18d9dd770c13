"""A real S3-protocol server on 127.0.0.1 (moto's server mode): real HTTP, real S3 requests, so the
run dir's object-store path (pyarrow's S3 filesystem, Ray Data, Ray Train's storage) is tested
as it runs against AWS or MinIO. The endpoint reaches every client through `AWS_ENDPOINT_URL`,
as boto3, the AWS CLI and pyarrow read it; the credentials are moto's dummies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "runs", secret: str = "testing") -> Iterator[dict[str, str]]:
    """Start the server, create `bucket`, yield the environment a client needs; stop it after.
    moto takes any credentials: `secret` may be a random one that a test then looks for."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        _client(env).create_bucket(Bucket=bucket)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (what a cluster node's provider chain would give)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(env: dict[str, str], bucket: str, prefix: str = "") -> dict[str, int]:
    """`key → size` of every object under `prefix`, straight from the server (not through our code)."""
    client = _client(env)
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def get_text(env: dict[str, str], bucket: str, key: str) -> str:
    return _client(env).get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])  # fmt: skip
