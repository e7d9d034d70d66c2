"""Every rule for a tracking server that is down, restarting or slow, in one place: requests fail within seconds
instead of MLflow's own four minutes of retries, and pathsearch retries what it sends until a deadline.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import requests
from mlflow.exceptions import MlflowException

RETRY_EVERY_S = 3.0  # between attempts to send while the server is down
START_TIMEOUT_S = 30.0  # how long a search waits for its tracking server; env PATHSEARCH_MLFLOW_START_TIMEOUT_S
FLUSH_TIMEOUT_S = 300.0  # default deadline for what a search sends at its end; env PATHSEARCH_MLFLOW_FLUSH_TIMEOUT_S
# MLflow's HTTP client reads these at request time. Its defaults (7 retries, backoff factor 2, 120 s timeout)
# block one request against a dead server for about 4 minutes (sleeps 0, 4, 8, ... 120 s), and with it the Tune
# loop. No retry inside the client: pathsearch retries instead, and safely, since urllib3 would resend any method
# (a create_run whose answer was lost would create a second run; the trial logger looks the run up by tag first).
# A keep-alive connection that a restarted server closed is noticed by urllib3 before reuse, without a retry.
REQUEST_TIMEOUT_S = 5
# Artifact uploads and downloads go through the same client: a model's weights need more than 5 s on a slow link.
TRANSFER_TIMEOUT_S = 300
T = TypeVar("T")


def flush_timeout_s() -> float:
    return float(os.environ.get("PATHSEARCH_MLFLOW_FLUSH_TIMEOUT_S", FLUSH_TIMEOUT_S))


def start_timeout_s() -> float:
    return float(os.environ.get("PATHSEARCH_MLFLOW_START_TIMEOUT_S", START_TIMEOUT_S))


# the settings fail_fast made (not the user's), so a nested fail_fast, e.g. a transfer's longer timeout, may change them
_MADE: set[str] = set()


@contextmanager
def fail_fast(timeout_s: float = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """MLflow requests inside fail within `timeout_s` when the server is down, with no retry of their own; a
    setting the user made wins."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in wanted if k not in os.environ or k in _MADE}
    for key in saved:
        os.environ[key] = wanted[key]
        _MADE.add(key)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
                _MADE.discard(key)
            else:
                os.environ[key] = old


def is_retryable(err: BaseException) -> bool:
    """True for a server that is down, restarting or overloaded: connection errors, timeouts, HTTP 5xx/429/408.

    MLflow wraps a failed request in an MlflowException (INTERNAL_ERROR, i.e. 500) whose context is the requests
    error; a 4xx answer (invalid parameter, unknown run) is final, and so is any other error.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            return transient(cause.response.status_code)
        if isinstance(cause, MlflowException):
            return transient(cause.get_http_status_code())
        cause = cause.__cause__ or cause.__context__
    return False


def transient(status: int) -> bool:
    return status >= 500 or status in (408, 429)


# URIs whose server a deadline already ran out on in this process: later end-of-search calls try once, so a
# server that stays down costs one deadline, not one per call.
GAVE_UP: set[str] = set()


def deadline_s(tracking_uri: str, timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    return 0.0 if tracking_uri in GAVE_UP else flush_timeout_s()


def retry_until(
    tracking_uri: str,
    what: str,
    call: Callable[[], T],
    timeout_s: float | None = None,
    say_gave_up: bool = True,
) -> T | None:
    """`call()` with fail-fast requests, retried every few seconds while the server is unreachable, until a
    deadline (default: the flush timeout). Returns None, with a warning (unless the caller raises its own error:
    `say_gave_up=False`), when the deadline passes; raises what is not retryable."""
    timeout = deadline_s(tracking_uri, timeout_s)
    started = time.monotonic()
    warned = False
    while True:
        try:
            with fail_fast():
                result = call()
        except Exception as err:
            if not is_retryable(err):
                raise
            left = started + timeout - time.monotonic()
            if left <= 0:
                GAVE_UP.add(tracking_uri)
                if say_gave_up:
                    say(f"MLflow at {tracking_uri} still unreachable: gave up {what} ({reason(err)})")
                return None
            if not warned:
                say(f"MLflow at {tracking_uri} unreachable while {what}: retrying for up to {left:.0f}s")
                warned = True
            time.sleep(min(RETRY_EVERY_S, left))
        else:
            GAVE_UP.discard(tracking_uri)
            if warned:
                say(f"MLflow at {tracking_uri} reachable again after {time.monotonic() - started:.0f}s: {what} done")
            return result


def reason(err: BaseException) -> str:
    """The innermost cause of a failed request, e.g. 'ConnectionRefusedError: [Errno 111] Connection refused'."""
    for _ in range(20):  # bounded: a chain can loop
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    return f"{type(err).__name__}: {err}"[:300]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
