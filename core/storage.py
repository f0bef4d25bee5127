"""S3-compatible object storage (boto3). Keys are namespaced per tenant."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_s3_client(
    settings: Settings, max_attempts: int | None = None, read_timeout_s: float | None = None
) -> S3Client:
    """A client whose every call ends within `max_attempts` (default: s3_max_attempts) attempts of at most
    s3_connect_timeout_s to connect and `read_timeout_s` (default: s3_read_timeout_s) per read, plus backoff."""
    secret = settings.s3_secret_access_key
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts or settings.s3_max_attempts, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=read_timeout_s or settings.s3_read_timeout_s,
        ),
    )


def ensure_bucket(client: S3Client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def output_key(tenant_id: str, prediction_id: str, filename: str) -> str:
    return f"{tenant_id}/{prediction_id}/{filename}"
