"""A real S3 endpoint on loopback (moto in server mode) and clients for it."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.devcluster.processes import free_ports

# moto accepts any credentials; these only have to be present and consistent.
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"


def client_config():
    """botocore Config for S3-compatible servers.

    boto3 >= 1.36 adds CRC checksums to every request by default, which several
    S3-compatible servers reject; path-style addressing avoids bucket DNS names.
    """
    from botocore.config import Config

    return Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
    )


def s3_client(endpoint_url: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=client_config(),
    )


@dataclass
class S3Server:
    endpoint_url: str
    client: object  # a boto3 S3 client for endpoint_url
    _server: object

    def new_client(self):
        """Another client (boto3 clients are thread-safe, sessions are not)."""
        return s3_client(self.endpoint_url)

    def stop(self) -> None:
        self._server.stop()


def start_s3_server() -> S3Server:
    """Start moto's S3 server in a thread on a free loopback port."""
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    return S3Server(endpoint, s3_client(endpoint), server)
