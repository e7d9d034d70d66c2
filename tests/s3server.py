"""An S3-compatible HTTP server for tests: moto's standalone server (`moto[server]`) on 127.0.0.1 with credentials
enforced (moto's IAM authentication: only the access key made here is accepted, a wrong secret is refused), and one
bucket. Usage: `with S3Server() as s3: ... s3.env ...`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(
        self, bucket: str = "pathsearch", host: str = "127.0.0.1", port: int | None = None, log: Path | None = None
    ) -> None:
        self.bucket, self.host, self.port = bucket, host, free_port() if port is None else port
        self.log = log  # the server's request log (one line per request), when given
        self.endpoint = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = self.secret = ""

    @property
    def env(self) -> dict[str, str]:
        """The standard variables every S3 client here reads (pyarrow, boto3 in MLflow); nothing else is needed."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> S3Server:
        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        # the first 3 requests (user, key, policy) are let through; every later one needs the key they made
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # the server writes it while it runs
        self.proc = subprocess.Popen(
            [moto, "-H", self.host, "-p", str(self.port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.2)
        iam = self.client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="pathsearch")
        made = iam.create_access_key(UserName="pathsearch")["AccessKey"]
        self.key, self.secret = made["AccessKeyId"], made["SecretAccessKey"]
        iam.put_user_policy(UserName="pathsearch", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
        self.client("s3").create_bucket(Bucket=self.bucket)
        return self

    def client(self, service: str, key: str | None = None, secret: str | None = None) -> Any:
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=key or self.key, aws_secret_access_key=secret or self.secret,
        )  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`."""
        pages = self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return bytes(self.client("s3").get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def size(self, prefix: str = "") -> int:
        pages = self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sum(item["Size"] for page in pages for item in page.get("Contents", []))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def main() -> None:
    """`python tests/s3server.py serve PORT`: runs the server (e.g. inside a network namespace) and prints its
    environment as one JSON line once it takes requests; stops on SIGTERM. `python tests/s3server.py keys PREFIX`
    prints the keys under PREFIX as JSON, with the store's environment already set."""
    if sys.argv[1] == "serve":
        with S3Server(port=int(sys.argv[2])) as server:
            print(json.dumps(server.env), flush=True)
            stop = {signal.SIGTERM, signal.SIGINT}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # now, not before: the server must not inherit the mask
            signal.sigwait(stop)  # then the `with` stops the server
    else:
        server = S3Server(port=0)
        server.endpoint, server.key, server.secret = (os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                                             "AWS_SECRET_ACCESS_KEY"))  # fmt: skip
        print(json.dumps(server.keys(sys.argv[2])))


if __name__ == "__main__":
    main()
