"""Searches on a Ray cluster through Ray's Jobs API: submit, status, logs, stop, and the checks made first.

`submit` ships the search file (runtime_env `working_dir`) and this package (`py_modules`) and runs
`python -m pathsearch.cli search ... --address auto` as a Ray job on the head node. Ray's token authentication
stays on: the token is read the way the `ray` CLI reads it and sent as a bearer header. Before the search is
submitted, the tracking URI and storage path are checked: by their form here, then from every node of the
cluster by a short preflight job. `check_cluster` reports, before a first submission, everything a search on a
cluster needs (`pathsearch cluster check`). Imports no torch or Ray at module level.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathsearch
from pathsearch import storage
from pathsearch.storage.rundirs import unique_run_name

LOCAL_ONLY_SCHEMES = ("sqlite", "file", "")  # a store only the head node could open
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
NODE_PYTHON = "python"  # the nodes' interpreter, not this machine's path
TERMINAL_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


# ----- the token --------------------------------------------------------------------------------------------
def read_ray_token() -> tuple[str | None, str]:
    """The cluster's token and where it came from, looked up in the `ray` CLI's order: RAY_AUTH_TOKEN, the file
    at RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. (Ray's own loader lives in its C++ core with no public
    Python reader, so the lookup is repeated here.)"""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    source = f"RAY_AUTH_TOKEN_PATH={path}" if os.environ.get("RAY_AUTH_TOKEN_PATH") else str(path)
    token = path.read_text().strip() if path.is_file() else ""
    return token or None, source


def auth_headers() -> tuple[dict[str, str], str]:
    """Bearer header for the dashboard, unless the user turned authentication off (RAY_AUTH_MODE=disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}, "RAY_AUTH_MODE=disabled"
    token, source = read_ray_token()
    return ({"Authorization": f"Bearer {token}"} if token else {}), source


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address!r}: give the Ray dashboard's http(s)://HOST:PORT (default port 8265)")
    return address.rstrip("/")


def _auth_problem(address: str, status: int, source: str) -> str:
    if status == 401:
        return (
            f"Ray at {address} asks for a token and none was found (looked in RAY_AUTH_TOKEN, then {source}); "
            "copy the cluster's token there (on the head: `ray get-auth-token`)"
        )
    return f"Ray at {address} refused the token from {source}: not this cluster's (`ray get-auth-token` on the head)"


def get_json(address: str, route: str, timeout: float = 10.0) -> Any:
    headers, source = auth_headers()
    request = urllib.request.Request(address + route, headers=headers)
    path = route.partition("?")[0]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ValueError(_auth_problem(address, err.code, source)) from None
        if err.code == 404:
            raise ValueError(f"{address} is not a Ray dashboard: GET {path} answered HTTP 404 (not found)") from None
        raise ValueError(f"Ray at {address}{route} answered HTTP {err.code}: {err.read()[:200]!r}") from None
    except json.JSONDecodeError:
        raise ValueError(f"{address} is not a Ray dashboard: GET {path} answered, but not with JSON") from None
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"no Ray dashboard at {address}: {getattr(err, 'reason', err)}") from None


def list_nodes(address: str) -> list[dict[str, Any]]:
    """The cluster's alive nodes (Ray's state API), checking the address and the token on the way."""
    body = get_json(address, "/api/v0/nodes?detail=false&limit=10000")
    try:
        return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{address} is not a Ray dashboard: /api/v0/nodes holds no node list") from None


def job_client(address: str) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers, source = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise ValueError(_auth_problem(address, 401 if "Missing" in str(err) else 403, source)) from None
    except ConnectionError as err:
        raise ValueError(f"no Ray dashboard at {address}: {str(err).splitlines()[0]}") from None


# ----- what every node must reach ---------------------------------------------------------------------------
def scheme_host(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower() if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    return scheme, (parsed.hostname or "").lower()


def check_reachable_by_form(tracking_uri: str, storage_path: str, nodes: Sequence[dict[str, Any]]) -> list[str]:
    """Problems visible from the URI and path alone: a local store or a relative path on a multi-node cluster.
    (Every node of a cluster on one machine shares its loopback and disk, so only hosts are counted there.)"""
    return tracking_form_problems(tracking_uri, nodes) + storage_form_problems(storage_path)


def tracking_form_problems(tracking_uri: str, nodes: Sequence[dict[str, Any]]) -> list[str]:
    problems = []
    hosts = {n.get("node_ip") for n in nodes}
    scheme, host = scheme_host(tracking_uri)
    if len(nodes) > 1 and scheme in LOCAL_ONLY_SCHEMES:
        problems.append(
            f"--tracking-uri {tracking_uri}: a local MLflow store, but the cluster has {len(nodes)} nodes; "
            "give an MLflow server every node and you can reach (http://HOST:5000): `python -m "
            "pathsearch.cluster.local up` starts one with a local cluster on this machine, and `mlflow server --host "
            "0.0.0.0` with a database store runs a shared one (the repository's cluster/mlflow/ deploys it)"
        )
    elif scheme in LOCAL_ONLY_SCHEMES and not _local_store_path(tracking_uri).is_absolute():
        problems.append(
            f"--tracking-uri {tracking_uri}: a relative path names a store inside the job's temporary working "
            "directory, deleted after the job; give an MLflow server (or, on a one-node cluster, an absolute path)"
        )
    elif len(hosts) > 1 and host in LOOPBACK_HOSTS:
        problems.append(
            f"--tracking-uri {tracking_uri}: a loopback address, but the cluster spans {len(hosts)} hosts; "
            "give the MLflow server's address as the nodes see it"
        )
    return problems


def storage_form_problems(storage_path: str) -> list[str]:
    problems = []
    scheme, _ = scheme_host(storage_path)
    if scheme in ("", "file"):
        local = Path(urllib.parse.urlparse(storage_path).path if scheme == "file" else storage_path)
        if not local.is_absolute():
            problems.append(
                f"--storage-path {storage_path}: a relative path names a folder inside the job's temporary "
                "working directory on the head node; give an absolute path on a filesystem every node mounts"
            )
    else:  # an object store: its scheme must open, and no credentials may travel in the URI (each node has its own)
        try:
            storage.check_form(storage_path)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _local_store_path(uri: str) -> Path:
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            return Path(uri[len(prefix) :])
    return Path(uri)


def check_from_node(tracking_uri: str, storage_path: str, marker: str) -> list[str]:
    """Runs on one node: can it see the driver's marker file in the storage path, and reach the tracking URI?"""
    where = _this_node()
    found = (storage_problem(storage_path, marker, where), tracking_problem(tracking_uri, where))
    return [problem for problem in found if problem]


def _this_node() -> str:
    import ray

    return f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"


def storage_problem(storage_path: str, marker: str, where: str) -> str | None:
    """Why the node `where` (this process's) cannot see the marker file the driver wrote into the storage path."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(as_uri(storage_path))
        if fs.get_file_info(f"{root}/{marker}").type == pyarrow.fs.FileType.NotFound:
            return f"{where} cannot see --storage-path {storage_path} (not the same filesystem)"
    except Exception as err:  # any failure to open the store is the finding itself
        return f"{where} cannot open --storage-path {storage_path}: {str(err).strip().splitlines()[0]}"
    return None


def tracking_problem(tracking_uri: str, where: str) -> str | None:
    """Why the node `where` (this process's) cannot reach an MLflow server's /health (None for a local store)."""
    scheme, _ = scheme_host(tracking_uri)
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError) as err:
            return f"{where} cannot reach --tracking-uri {tracking_uri}: {getattr(err, 'reason', err)}"
    return None


def as_uri(storage_path: str) -> str:
    return storage_path if "://" in storage_path else Path(storage_path).as_uri()


def preflight(tracking_uri: str, storage_path: str) -> list[str]:
    """In a Ray job on the cluster: writes a marker into the storage path, then asks every alive node (with a
    zero-CPU task pinned to it) to find the marker and reach the tracking URI."""
    import pyarrow.fs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto")
    if storage.is_remote(storage_path):
        try:  # from the driver's node first: the bucket, the credentials, the endpoint (one line if not)
            storage.check(storage_path)
        except ValueError as err:
            return [f"node {ray.util.get_node_ip_address()} (the driver's): {err}"]
    marker = f".pathsearch-preflight-{uuid.uuid4().hex}"
    fs, root = pyarrow.fs.FileSystem.from_uri(as_uri(storage_path))
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{marker}") as out:
        out.write(b"ok")
    try:
        check = ray.remote(num_cpus=0)(check_from_node)
        refs = [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                tracking_uri, storage_path, marker
            )
            for node in ray.nodes()
            if node["Alive"]
        ]
        return [problem for found in ray.get(refs, timeout=120) for problem in found]
    finally:
        fs.delete_file(f"{root}/{marker}")


# ----- jobs ---------------------------------------------------------------------------------------------------
@dataclass
class Submission:
    job_id: str
    address: str
    name: str
    tracking_uri: str
    storage_path: str


def _runtime_env(search_file: Path | None) -> tuple[dict[str, Any], tempfile.TemporaryDirectory[str]]:
    """The job's files: the search file alone as working_dir (uploaded), this package as a py_module (so the
    cluster runs the same pathsearch as this machine, installed there or not)."""
    folder = tempfile.TemporaryDirectory(prefix="pathsearch-job-")
    if search_file is not None:
        (Path(folder.name) / "search.yaml").write_text(search_file.read_text())
    env = {
        "working_dir": folder.name,
        "py_modules": [str(Path(pathsearch.__file__).parent)],
        # `stop` interrupts the driver as Ctrl-C does (Ray's default, SIGTERM then SIGKILL after 3 s, would end
        # it before it could close its trials' runs): Tune stops, runs end KILLED (INTERRUPTED).
        "env_vars": {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"},
    }
    return env, folder


def run_module_job(
    client: Any, args: Sequence[str], timeout_s: float = 300, module: str = "pathsearch.cluster.jobs"
) -> tuple[str, str, str]:
    """(job id, final status, logs) of `python -m MODULE ARGS` run as a job on the head, with this package shipped
    as it is for a search (zero CPUs: it runs on a head that offers none)."""
    env, folder = _runtime_env(None)
    with folder:
        job = client.submit_job(
            entrypoint=shlex.join([NODE_PYTHON, "-m", module, *args]),
            runtime_env=env,
            submission_id=f"pathsearch-{args[0]}-{uuid.uuid4().hex[:8]}",
            entrypoint_num_cpus=0,
        )
    status = wait_for_job(client, job, timeout_s)
    return job, status, client.get_job_logs(job)


def _run_checks(client: Any, tracking_uri: str, storage_path: str, timeout_s: float = 300) -> list[str]:
    job, status, logs = run_module_job(client, ["preflight", tracking_uri, storage_path], timeout_s)
    found = [line.removeprefix("PROBLEM ") for line in logs.splitlines() if line.startswith("PROBLEM ")]
    if status != "SUCCEEDED" and not found:
        tail = "\n".join(logs.strip().splitlines()[-5:])
        found.append(f"the preflight job {job} ended {status}:\n{tail}")
    return found


def wait_for_job(client: Any, job_id: str, timeout_s: float) -> str:
    """The job's status once it ends (SUCCEEDED, FAILED, STOPPED), or its status when `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_EXIT or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def submit_search(
    search_file: str | Path,
    address: str | None,
    tracking_uri: str | None,
    storage_path: str | None,
    overrides: Sequence[str] = (),
    name: str | None = None,
    check: bool = True,
    say: Callable[[str], None] = print,
) -> Submission:
    """Submits a validated search file as a Ray job and returns at once (the job id is the run name)."""
    path = Path(search_file)
    address = dashboard_address(address)
    if not tracking_uri:
        raise ValueError("--tracking-uri is required on a cluster: an MLflow server the nodes and you can reach")
    if not storage_path:
        raise ValueError("--storage-path is required on a cluster: a shared folder or object store URI for trials")
    nodes = list_nodes(address)  # also proves the address and the token
    problems = check_reachable_by_form(tracking_uri, storage_path, nodes)
    if problems:
        raise ValueError("\n".join(problems))
    client = job_client(address)
    if check:
        say(f"checking the tracking URI and storage path from {len(nodes)} node(s) ...")
        problems = _run_checks(client, tracking_uri, storage_path)
        if problems:
            raise ValueError("\n".join(problems))
    env, folder = _runtime_env(path)

    def submit(job_name: str) -> str | None:
        args = ["search", "search.yaml", "--address", "auto", "--name", job_name]
        args += ["--tracking-uri", tracking_uri, "--storage-path", storage_path]
        for item in overrides:
            args += ["--set", item]
        return _submit_job(
            client,
            entrypoint=shlex.join([NODE_PYTHON, "-m", "pathsearch.cli", *args]),
            runtime_env=env,
            submission_id=job_name,
            metadata={"pathsearch.search_file": path.name, "pathsearch.tracking_uri": tracking_uri},
            entrypoint_num_cpus=0,  # the driver only schedules; CPUs are for trials
        )

    with folder:
        name, job_id = claim_job_name(name, path.stem, submit, storage_path)
    return Submission(job_id, address, name, tracking_uri, storage_path)


def submit_resume(run_dir: str, address: str | None, name: str | None = None) -> Submission:
    """Submits `pathsearch resume RUN_DIR` as a Ray job: a stopped or crashed cluster search continues where it
    was (RUN_DIR is on the shared storage path, as the search's driver wrote it, or its URI in an object store:
    the job's driver makes a working copy from there, on whichever node it runs)."""
    address = dashboard_address(address)
    remote = storage.is_remote(run_dir)
    if remote:
        run_dir = run_dir.rstrip("/")
        storage.check_form(run_dir, "--resume")  # a scheme pyarrow opens, no credentials in it
    elif not Path(run_dir).is_absolute():
        raise ValueError(f"--resume {run_dir}: give the run directory's absolute path on the shared storage")
    run_name = storage.name_of(run_dir) if remote else Path(run_dir).name
    list_nodes(address)  # proves the address and the token
    client = job_client(address)
    env, folder = _runtime_env(None)

    def submit(job_name: str) -> str | None:
        return _submit_job(
            client,
            entrypoint=shlex.join([NODE_PYTHON, "-m", "pathsearch.cli", "resume", run_dir, "--address", "auto"]),
            runtime_env=env,
            submission_id=job_name,
            metadata={"pathsearch.resume": run_dir},
            entrypoint_num_cpus=0,
        )

    with folder:
        name, job_id = claim_job_name(name, f"{run_name}-resumed", submit)
    return Submission(job_id, address, run_name, _tracking_uri_of(run_dir), _parent(run_dir))


def _tracking_uri_of(run_dir: str) -> str:
    """The run's tracking URI when this machine can read its state (it mounts the storage, or has the store's
    credentials), else a placeholder: the job reads it where it runs."""
    try:
        return str(json.loads(storage.read_text(storage.join(run_dir, "pathsearch_state.json")))["tracking_uri"])
    except (OSError, ValueError, KeyError):
        return "(the run's own)"


def _parent(run_dir: str) -> str:
    return storage.parent_of(run_dir) if storage.is_remote(run_dir) else str(Path(run_dir).parent)


def _submit_job(client: Any, **job: Any) -> str | None:
    """The new job's id, or None when the cluster has a job of that submission id already."""
    try:
        return str(client.submit_job(**job))
    except RuntimeError as err:
        if "already exists" in str(err):
            return None
        raise


def claim_job_name(
    name: str | None, stem: str, submit: Callable[[str], str | None], storage_path: str | None = None
) -> tuple[str, str]:
    """(name, job id) of a job submitted under the user's `name`, or else under the first free one of
    `<stem>-<YYYYmmdd-HHMMSS>`, -2, -3, ... (unique_run_name): the cluster's unique submission ids make two jobs
    submitted in the same second take two names, and a name whose run folder is visible here under `storage_path`
    is skipped (the search would refuse to start in it)."""
    if name is not None:
        job_id = submit(name)
        if job_id is None:
            raise ValueError(f"a job named {name!r} already exists on the cluster: pass another --name")
        return name, job_id
    submitted: list[str] = []

    def claim(candidate: str) -> bool:
        if storage_path is not None and "://" not in storage_path and (Path(storage_path) / candidate).exists():
            return False
        job_id = submit(candidate)
        if job_id is None:
            return False
        submitted.append(job_id)
        return True

    name = unique_run_name(stem, claim)
    return name, submitted[-1]


def _known_job(client: Any, job_id: str, address: str) -> None:
    try:
        client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise ValueError(f"no job {job_id!r} on the cluster at {address}") from None
        raise


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    address = dashboard_address(address)
    client = job_client(address)
    _known_job(client, job_id, address)
    info = client.get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "entrypoint": info.entrypoint,
    }


def job_logs(address: str | None, job_id: str, follow: bool = False, out: Any = None) -> str:
    """The job's output so far; with `follow`, streams it until the job ends and returns its final status."""
    out = out or sys.stdout
    address = dashboard_address(address)
    client = job_client(address)
    _known_job(client, job_id, address)
    if not follow:
        out.write(client.get_job_logs(job_id))
        return str(client.get_job_status(job_id).value)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait_for_job(client, job_id, timeout_s=60)  # the log stream closes as the job ends


def stop_job(address: str | None, job_id: str, wait_s: float = 60) -> str:
    address = dashboard_address(address)
    client = job_client(address)
    _known_job(client, job_id, address)
    client.stop_job(job_id)
    return wait_for_job(client, job_id, wait_s)


def main(argv: Sequence[str]) -> int:
    """`python -m pathsearch.cluster.jobs preflight URI PATH`: the preflight job's entrypoint (one line per problem)."""
    if argv[:1] == ["preflight"] and len(argv) == 3:
        problems = preflight(argv[1], argv[2])
        for problem in problems:
            print(f"PROBLEM {problem}", flush=True)
        print(f"preflight: {len(problems)} problem(s)")
        return 0
    print("usage: python -m pathsearch.cluster.jobs preflight TRACKING_URI STORAGE_PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
