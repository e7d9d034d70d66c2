"""No file of the repository holds a credential: a private key, a cloud or chat token, a literal password.

The files are those git tracks plus the untracked ones it does not ignore (what `git add -A` would take). A value
may stand in for a credential as a reference (`${VAR}`, `${VAR:?...}`, `$VAR`, `$(command)`), an `<angle>`
placeholder or a CHANGE-ME placeholder. The planted examples below are put together at run time, so this file
never holds one itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"CHANGE[-_]?ME|^\$|^<[^>]*>$|^\*+$|^\.\.\.$", re.IGNORECASE)
# (what, pattern, whether a placeholder value excuses it); group 1, where there is one, is the value judged.
RULES: list[tuple[str, re.Pattern[str], bool]] = [
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), False),
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), False),
    (
        "AWS secret access key",
        re.compile(r"(?i)aws_?secret_?(?:access_?)?key['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"),
        True,
    ),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"), False),
    ("GitHub token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}"), False),
    ("Slack token", re.compile(r"\bxox[abeoprs]-[A-Za-z0-9-]{10,}"), False),
    ("Slack webhook", re.compile(r"hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+"), False),
    ("password", re.compile(r"(?i)passw(?:or)?d\w*['\"]?\s*[:=]\s*['\"]?([^\s'\"$<{]{6,})"), True),
    ("credentials in a URL", re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]+:([^\s@/'\"]+)@", re.IGNORECASE), True),
    ("Ray auth token", re.compile(r"(?i)\b(?:ray_)?auth_token['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9_-]{16,})"), True),
    ("bearer token", re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{32,}=*)"), True),
]


def find_secrets(text: str) -> list[tuple[int, str]]:
    """(line number, what) for every credential-looking value in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern, placeholders_allowed in RULES:
            for match in pattern.finditer(line):
                value = match.group(1) if pattern.groups else match.group(0)
                if placeholders_allowed and (PLACEHOLDER.search(value) or "(" in value or "[" in value):
                    continue  # a reference, a placeholder, or code (a call or subscript), not a literal
                found.append((number, what))
    return found


def repository_files() -> list[Path]:
    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", *args, "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [name for name in out.decode().split("\0") if name]

    try:
        names = git("ls-files") + git("ls-files", "--others", "--exclude-standard")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree: no file list to scan")
    return [ROOT / name for name in sorted(set(names)) if (ROOT / name).is_file()]


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def test_no_file_holds_a_secret():
    files = repository_files()
    assert files, "git lists no file"
    found = [
        f"{path.relative_to(ROOT)}:{number}: {what}"
        for path in files
        if (text := read_text(path)) is not None
        for number, what in find_secrets(text)
    ]
    assert found == []


# Put together here so that no literal secret is ever in the repository.
PLANTED = {
    "private key": "-----BEGIN " + "RSA PRIVATE KEY-----",
    "OpenSSH private key": "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
    "AWS access key id": "aws_access_key_id = " + "AKIA" + "Q3EXAMPLEKEY7H2Z",
    "AWS secret access key": "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY",
    "GitHub token": "token: " + "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2,
    "Slack token": "SLACK=" + "xoxb-" + "1234567890-abcdefghij",
    "Slack webhook": "https://hooks.slack.com/services/" + "T0001/B0002/" + "abcdefXYZ123",
    "password in YAML": "  POSTGRES_PASSWORD: " + "hunter2hunter2",
    "password in env": "MINIO_ROOT_PASSWORD=" + "s3cr3t-Value",
    "password in code": 'connect(password="' + 'correct horse")',
    "credentials in a URL": "postgresql://mlflow:" + "pa55word@postgres:5432/mlflow",
    "credentials in a git URL": "git+https://bot:" + "tok3nvalue@github.com/org/repo.git",
    "Ray auth token": "RAY_AUTH_TOKEN=" + "0123456789abcdef" * 4,
    "bearer token": "Authorization: Bearer " + "0123456789abcdef" * 4,
}

ALLOWED = {
    "compose reference": "      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in cluster/mlflow/.env}",
    "reference in a URL": "postgresql://mlflow:${POSTGRES_PASSWORD:?set it}@postgres:5432/mlflow",
    "plain reference in a URL": "postgresql://mlflow:$POSTGRES_PASSWORD@postgres:5432/mlflow",
    "placeholder": "POSTGRES_PASSWORD=CHANGE-ME # CHANGE: the PostgreSQL password",
    "placeholder in a URL": "https://admin:CHANGE-ME@mlflow.example.org",
    "angle placeholder": "export MLFLOW_TRACKING_PASSWORD=<password>",
    "command substitution": 'export RAY_AUTH_TOKEN="$(kubectl get secret pathsearch -o jsonpath=...)"',
    "secret reference": "valueFrom: {secretKeyRef: {name: pathsearch-mlflow, key: MLFLOW_TRACKING_PASSWORD}}",
    "secret key name": "              key: auth_token",
    "file mount": '  "~/.ray/auth_token": "~/.ray/auth_token"',
    "code reading a variable": 'password = os.environ["MLFLOW_TRACKING_PASSWORD"]',
    "prose": "The password: the one you set in .env, and the token file at ~/.ray/auth_token.",
    "URL without credentials": "http://127.0.0.1:5000 and ssh://git@github.com/org/repo",
}


@pytest.mark.parametrize("text", PLANTED.values(), ids=PLANTED.keys())
def test_checker_catches_a_planted_secret(text):
    assert find_secrets(text), text


@pytest.mark.parametrize("text", ALLOWED.values(), ids=ALLOWED.keys())
def test_checker_passes_references_and_placeholders(text):
    assert find_secrets(text) == []
