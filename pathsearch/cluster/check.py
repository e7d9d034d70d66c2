"""`pathsearch cluster check`: before a first submission, what a search on a cluster needs and whether it holds, one
finding a line. From here: the dashboard and the token, Ray on the head against Ray here, the pathsearch that submit
would ship. From a short job on the head (`inspect_cluster`, shipped and run as a search's driver would be): the
autoscaler, requests left by drivers that died, and every node: its Ray, Python, torch and timm, GPUs visible to a task
given one, the tracking URI and the storage path as that node reaches them. Workers an autoscaler has not started
yet are checks it cannot make yet ("not yet"), not failures. Imports Ray only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pathsearch
from pathsearch import storage
from pathsearch.cluster.jobs import (
    NODE_PYTHON,
    TERMINAL_EXIT,
    as_uri,
    auth_headers,
    dashboard_address,
    get_json,
    job_client,
    list_nodes,
    run_module_job,
    scheme_host,
    storage_form_problems,
    storage_problem,
    tracking_form_problems,
    tracking_problem,
)

# ----- `pathsearch cluster check`: what a search on the cluster needs, and whether it holds -------------------
Status = Literal["ok", "FAIL", "not yet"]
NO_WORKER = "no worker is up (the autoscaler starts them when a search asks)"
NODE_WAIT_S = 120.0  # a node's checks, torch's import included
GPU_WAIT_S = 60.0  # how long a task given a GPU waits for one (a running search may hold them all)
INSTALL_FIX = "install torch and timm on every node (cluster/Dockerfile; the setup_commands of cluster/aws-gpu.yaml)"


@dataclass
class Finding:
    """One line of the report: ok, FAIL, or not yet (it cannot be checked yet); a FAIL names the fix to make."""

    status: Status
    text: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.status:<8} {self.text}"


@dataclass
class ClusterCheck:
    """`check_cluster`'s report: its findings in order (each said as it is found), and a last line."""

    address: str
    say: Callable[[str], None] = print
    findings: list[Finding] = field(default_factory=list)

    def add(self, status: Status, text: str, fix: str = "") -> None:
        self.findings.append(Finding(status, text, fix or text))
        self.say(str(self.findings[-1]))

    @property
    def failed(self) -> bool:
        return any(f.status == "FAIL" for f in self.findings)

    def last_line(self) -> str:
        first = next((f for f in self.findings if f.status == "FAIL"), None)
        if first is not None:
            return f"first fix: {first.fix}"
        waiting = sum(f.status == "not yet" for f in self.findings)
        return f"nothing failed{f'; {waiting} not yet' if waiting else ''}: a search can be submitted to {self.address}"


def check_cluster(
    address: str | None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    say: Callable[[str], None] = print,
    verbose: bool = False,
) -> ClusterCheck:
    """What a search on the cluster at `address` needs, and whether it holds, said one finding a line: the
    dashboard and the token, Ray on the head against Ray here, the pathsearch that submit would ship; then, from a
    short job on the head (`inspect_cluster`), the autoscaler and every node: its Ray, Python, torch and timm, the
    shipped pathsearch importing there, its GPUs, and the tracking URI and storage path (when given) as it sees
    them. Raises ValueError only for bad input (no address)."""
    if not (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        raise ValueError(
            "no cluster given: `pathsearch cluster check http://HEAD:8265` (the Ray dashboard), or set RAY_ADDRESS"
        )
    report = ClusterCheck(dashboard_address(address), say)
    headers, source = auth_headers()
    try:
        nodes = list_nodes(report.address)
        head = str(get_json(report.address, "/api/version").get("ray_version", "?"))
    except ValueError as err:
        address_fix = "give the Ray dashboard's address, http://HEAD:8265 (`ray dashboard CLUSTER.yaml` or "
        address_fix += "`kubectl port-forward` forwards it)"
        report.add("FAIL", f"dashboard: {err}", str(err) if "token" in str(err) else address_fix)
        return report
    token = f"it accepts the token from {source}" if headers else f"it asks for no token (none in {source})"
    report.add("ok", f"dashboard: Ray's dashboard answers at {report.address}; {token}")
    here = _version_of("ray")
    if head.split(".")[:2] == here.split(".")[:2]:
        report.add("ok", f"Ray {head} on the head, {here} here" if head != here else f"Ray {here} on the head and here")
    else:
        report.add(
            "FAIL",
            f"Ray {head} on the head, {here} here: pathsearch here is made for Ray {here}",
            f"install Ray {head} here (pip install 'ray[default,tune]=={head}'), or run the cluster on {here}",
        )
    package = Path(pathsearch.__file__).parent
    shipped = package_digest(package)
    report.add(
        "ok",
        f"pathsearch {_version_of('pathsearch')} here ({package}, files {shipped}): submit ships this "
        "package with each job (py_modules), so every node runs this copy, installed there or not",
    )
    checked = {}  # flag -> what the nodes check ("": not given, or refused by its form already)
    for flag, given, problems in (
        ("tracking-uri", tracking_uri, tracking_form_problems(tracking_uri or "", nodes)),
        ("storage-path", storage_path, storage_form_problems(storage_path or "")),
    ):
        if not given:
            report.add(
                "not yet", f"--{flag}: not checked: give --tracking-uri/--storage-path (those you will submit with)"
            )
        for problem in problems if given else []:
            report.add("FAIL", problem)
        checked[flag] = given if given and not problems else ""
    found = _inspect(report, checked, verbose)
    if found is not None:
        _report_nodes(report, found, checked, shipped)
    return report


def _inspect(report: ClusterCheck, checked: dict[str, str], verbose: bool) -> dict[str, Any] | None:
    """`inspect_cluster`'s findings, from a job on the head (None, with a FAIL said, when it gave none)."""
    try:
        client = job_client(report.address)
        # Ray's lines on packing and uploading the package (its Jobs SDK logs at INFO whatever "ray" is set to)
        loggers = [logging.getLogger(name) for name in ("ray", "ray.dashboard.modules.dashboard_sdk")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.INFO if verbose else logging.WARNING)
        try:
            job, status, logs = run_module_job(
                client, ["inspect", checked["tracking-uri"], checked["storage-path"]], module=__name__
            )
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
    except (ValueError, RuntimeError) as err:
        report.add("FAIL", f"the check job could not be submitted: {err}", f"make Ray jobs run on the cluster: {err}")
        return None
    if status not in TERMINAL_EXIT:
        client.stop_job(job)
    if verbose:
        print(f"the check job {job} ended {status}; its log:\n{logs}", file=sys.stderr)
    line = next((line for line in reversed(logs.splitlines()) if line.startswith("CHECK ")), None)
    if line is not None:
        return dict(json.loads(line.removeprefix("CHECK ")))
    last = (logs.strip().splitlines() or ["(no output)"])[-1]
    fix = f"read the check job's log: pathsearch logs {job} --address {report.address}"
    if "ModuleNotFoundError" in last or "not found" in last:
        fix = f"make the head's `{NODE_PYTHON}` the Python that has Ray (first on the PATH of `ray start --head`)"
    report.add("FAIL", f"the check job {job} on the head ended {status} without a report: {last}", fix)
    return None


def _report_nodes(report: ClusterCheck, found: dict[str, Any], checked: dict[str, str], shipped: str) -> None:
    nodes = found["nodes"]
    workers = [node for node in nodes if not node["head"]]
    cpus, gpus = (sum(node["resources"].get(name, 0.0) for node in nodes) for name in ("CPU", "GPU"))
    counted = f"{len(workers)} worker{'s' if len(workers) != 1 else ''}" if workers else "no worker"
    report.add("ok", f"nodes: {len(nodes)} alive, the head and {counted}; CPU {cpus:g}, GPU {gpus:g} in all")
    scaler = found.get("autoscaler")
    if found.get("autoscaler_error"):
        report.add("not yet", f"autoscaler: could not be read: {found['autoscaler_error']}")
    elif scaler is None:
        report.add("ok", "autoscaler: none: a search runs on the live nodes (a trial none of them holds is refused)")
    elif scaler["types"] is None:
        report.add(
            "ok",
            f"autoscaler: v{scaler['version']}: node types not published by autoscaler v1 (a search "
            "asks it for workers and waits up to search.autoscaler_wait_min for one)",
        )
    else:
        report.add("ok", f"autoscaler: v{scaler['version']}: node types it may start: {scaler['types']}")
    if found.get("cleared"):
        report.add(
            "ok",
            f"autoscaler requests: cleared {', '.join(found['cleared'])}, left by a driver that died (a "
            "request left by a driver killed with kill -9 is cleared by the next pathsearch command on "
            "that cluster)",
        )
    elif not found.get("autoscaler_error"):
        report.add("ok", "autoscaler requests: none left by drivers that died")
    for node in nodes:
        for finding in _node_findings(node, found, checked, shipped):
            report.add(finding.status, finding.text, finding.fix)
    if workers:
        return
    head = nodes[0]["resources"] if nodes else {}
    if scaler is not None:
        checks = ["Ray, Python, torch, timm and the shipped pathsearch", "GPUs"]
        checks += [f"--{flag} seen from a worker" for flag, given in checked.items() if given]
        for what in checks:
            report.add("not yet", f"workers' {what}: {NO_WORKER}")
    elif head.get("CPU", 0.0) > 0 or head.get("GPU", 0.0) > 0:
        report.add("ok", f"workers: none; trials run on the head {_resources(head)}")
    else:
        report.add(
            "FAIL",
            "workers: none, the head offers no CPU or GPU, and no autoscaler starts workers: no trial can run",
            "start worker nodes (`ray start --address HEAD:6379` on each), or give the cluster an autoscaler",
        )


def _node_findings(node: dict[str, Any], found: dict[str, Any], checked: dict[str, str], shipped: str) -> list[Finding]:
    """One node's findings: its software (one line), its GPUs, the tracking URI and the storage path from it."""
    label, info, gpus = node["label"], node["info"], node["resources"].get("GPU", 0.0)
    if info is None:
        return [
            Finding(
                "FAIL",
                f"{label}: its checks did not run: {node['error']}",
                f"make the shipped pathsearch run on {label}: {node['error']}",
            )
        ]
    problems = []  # (what, fix)
    if info["digest"] != shipped:
        problems.append(
            (
                f"imports pathsearch from {info['package']} (files {info['digest']}), not the shipped one",
                f"remove the pathsearch that {label} imports ahead of the job's py_modules",
            )
        )
    if info["python"].split(".")[:2] != found["driver_python"].split(".")[:2]:
        problems.append(
            (
                f"Python {info['python']}, but {found['driver_python']} runs the driver",
                "run one Python minor version on every node",
            )
        )
    problems += [
        (f"{name} does not import: {info[name + '_error']}", INSTALL_FIX)
        for name in ("torch", "timm")
        if info[name] is None
    ]
    text = f"{label} {_resources(node['resources'])}: Ray {info['ray']}, Python {info['python']}, the shipped "
    text += f"pathsearch imports (files {info['digest']})"
    text += "".join(f", {name} {info[name]}" for name in ("torch", "timm") if info[name]) + ("" if gpus else ", no GPU")
    out = [Finding("ok", text)]
    if problems:
        out = [Finding("FAIL", f"{text}; {'; '.join(what for what, _ in problems)}", f"{label}: {problems[0][1]}")]
    gpu: dict[str, Any] = node.get("gpu") or {}
    if gpus and not gpu:
        out.append(Finding("not yet", f"{label}: GPUs: {node['gpu_error']}"))
    elif gpus and gpu["count"] != 1:
        seen = f"sees {gpu['count']} (CUDA_VISIBLE_DEVICES={gpu['visible']}, torch's CUDA {gpu['cuda']})"
        fix = (
            f"{label}: check its NVIDIA driver and that its torch is a CUDA build"
            if gpu["count"] == 0
            else f"{label}: let Ray set CUDA_VISIBLE_DEVICES (unset RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)"
        )
        out.append(Finding("FAIL", f"{label} offers {gpus:g} GPU(s) to Ray, but a task given one {seen}", fix))
    elif gpus:
        out.append(
            Finding("ok", f"{label}: a task given a GPU sees it: {gpu['names'][0]} (torch's CUDA {gpu['cuda']})")
        )
    uri, path = checked["tracking-uri"], checked["storage-path"]
    if uri and info["tracking"]:
        out.append(Finding("FAIL", info["tracking"], f"give a --tracking-uri every node reaches: {info['tracking']}"))
    elif uri:
        how = "/health answered" if scheme_host(uri)[0] in ("http", "https") else "a local store: the driver opens it"
        out.append(Finding("ok", f"{label} reaches --tracking-uri {uri} ({how})"))
    wrote, driver = found.get("storage_error"), node["id"] == found["driver_node"]
    if path and wrote:
        out.append(
            Finding("FAIL", wrote, f"give a --storage-path the driver can write: {wrote}")
            if driver
            else Finding("not yet", f"{label}: --storage-path {path}: the driver's node could not write it")
        )
    elif path and info["storage"]:
        out.append(Finding("FAIL", info["storage"], f"give a --storage-path every node sees: {info['storage']}"))
    elif path:
        how = "writes to" if driver else "sees"
        what = "the driver's node: it wrote a file there" if driver else "the file the driver wrote there"
        out.append(Finding("ok", f"{label} {how} --storage-path {path} ({what})"))
    return out


def package_digest(package: Path) -> str:
    """A short hash of a pathsearch package's Python files: the same on a node as here means the same code."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _resources(resources: dict[str, float]) -> str:
    """What a node offers to tasks: CPU, GPU and custom resources, then memory (not Ray's node: labels)."""
    other = [
        f"{k}: {v:g}"
        for k, v in resources.items()
        if k not in ("CPU", "memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))
    ]
    memory = f"memory: {resources.get('memory', 0.0) / 2**30:.1f} GiB"
    return "{" + ", ".join([f"CPU: {resources.get('CPU', 0.0):g}", *other, memory]) + "}"


def _short_ids(ids: Sequence[str]) -> dict[str, str]:
    """Node ids as the report names them: their first 8 digits, or their last 8 where those tell them apart
    (the fake provider's ids differ at the end), else whole."""
    for cut in (slice(None, 8), slice(-8, None)):
        if len({node[cut] for node in ids}) == len(ids):
            return {node: node[cut] for node in ids}
    return {node: node for node in ids}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def inspect_node(tracking_uri: str, storage_path: str, marker: str, where: str) -> dict[str, Any]:
    """Runs on one node, in the job's runtime env: its Ray, Python, torch and timm, the pathsearch it imports, and
    what it finds of the tracking URI and of the marker the driver wrote into the storage path."""
    import ray

    package = Path(pathsearch.__file__).parent
    found: dict[str, Any] = {"ray": ray.__version__, "python": platform.python_version()}
    found.update(package=str(package), digest=package_digest(package))
    for name in ("torch", "timm"):
        try:
            found[name] = str(importlib.import_module(name).__version__)
        except Exception as err:  # a missing or broken install is the finding itself
            found[name], found[f"{name}_error"] = None, _first_line(err)
    found["tracking"] = tracking_problem(tracking_uri, where) if tracking_uri else None
    found["storage"] = storage_problem(storage_path, marker, where) if storage_path and marker else None
    return found


def count_gpus() -> dict[str, Any]:
    """Runs in a task given one GPU: the GPUs torch sees there."""
    import torch

    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    return {
        "count": count,
        "names": names,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda": torch.version.cuda,
    }


def inspect_cluster(tracking_uri: str, storage_path: str) -> dict[str, Any]:
    """In a Ray job on the head: drops autoscaler requests that dead drivers left (`placement.tidy_requests`), reads
    the autoscaler, writes a marker into the storage path (when given), then runs `inspect_node` on every alive node
    (a zero-CPU task pinned to each) and `count_gpus` on each node with GPUs (a task given one)."""
    import pyarrow.fs
    import ray
    from ray.experimental.internal_kv import _internal_kv_list
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pathsearch.cluster import placement

    ray.init(address="auto")
    driver = ray.get_runtime_context().get_node_id()
    found: dict[str, Any] = {"driver_python": platform.python_version(), "driver_node": driver}

    def requests() -> set[str]:
        keys = _internal_kv_list(placement.REQUEST_PREFIX, namespace=placement.NAMESPACE)
        return {key.decode().removeprefix(placement.REQUEST_PREFIX) for key in keys}

    try:
        before = requests()
        placement.tidy_requests()
        found["cleared"] = sorted(before - requests())
        scaler = placement.find_autoscaler()
        types = None if scaler is None or scaler.node_types is None else scaler.type_list()
        found["autoscaler"] = None if scaler is None else {"version": scaler.version, "types": types}
    except Exception as err:  # reported; the nodes are still checked
        found["autoscaler_error"] = _first_line(err)
    alive = sorted(  # the head first, then the workers by address and id
        (n for n in ray.nodes() if n["Alive"]),
        key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"], n["NodeID"]),
    )
    short = _short_ids([n["NodeID"] for n in alive])
    labels = {
        n["NodeID"]: f"{'head' if 'node:__internal_head__' in n['Resources'] else 'worker'} "
        f"{n['NodeManagerAddress']} ({short[n['NodeID']]})"
        for n in alive
    }
    marker, fs, root = "", None, ""
    if storage_path:
        try:
            if storage.is_remote(storage_path):  # the bucket, the credentials, the endpoint: one line if not
                storage.check(storage_path)
            fs, root = pyarrow.fs.FileSystem.from_uri(as_uri(storage_path))
            fs.create_dir(root, recursive=True)
            marker = f".pathsearch-check-{uuid.uuid4().hex}"
            with fs.open_output_stream(f"{root}/{marker}") as out:
                out.write(b"ok")
        except Exception as err:  # the finding itself
            where = labels.get(driver, "the head")
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            found["storage_error"] = (
                f"{where}, the driver's node, cannot write --storage-path {storage_path}: {problem}"
            )
            marker, fs = "", None
    inspect, gpu = ray.remote(num_cpus=0)(inspect_node), ray.remote(num_cpus=0, num_gpus=1)(count_gpus)
    tasks, gpu_tasks = {}, {}
    for node in alive:
        pin = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        args = (tracking_uri, storage_path, marker, labels[node["NodeID"]])
        tasks[node["NodeID"]] = inspect.options(scheduling_strategy=pin).remote(*args)
        if node["Resources"].get("GPU", 0.0) > 0:
            gpu_tasks[node["NodeID"]] = gpu.options(scheduling_strategy=pin).remote()
    started = time.monotonic()
    ray.wait(list(tasks.values()), num_returns=len(tasks), timeout=NODE_WAIT_S)
    left = max(0.0, GPU_WAIT_S - (time.monotonic() - started))
    ray.wait(list(gpu_tasks.values()), num_returns=len(gpu_tasks), timeout=left)
    found["nodes"] = []
    for node in alive:
        entry = {"id": node["NodeID"], "label": labels[node["NodeID"]], "resources": node["Resources"]}
        entry["head"] = "node:__internal_head__" in node["Resources"]
        entry["info"], entry["error"] = _result(tasks[node["NodeID"]], f"no answer in {NODE_WAIT_S:g} s")
        if node["NodeID"] in gpu_tasks:
            busy = f"no GPU of it came free in {GPU_WAIT_S:g} s (trials hold them)"
            entry["gpu"], entry["gpu_error"] = _result(gpu_tasks[node["NodeID"]], busy)
        found["nodes"].append(entry)
    if fs is not None:
        fs.delete_file(f"{root}/{marker}")
    return found


def _result(ref: Any, waiting: str) -> tuple[Any, str | None]:
    """(a finished task's value, None), or (None, why there is none: its error, or `waiting`)."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        ray.cancel(ref, force=True)
        return None, waiting
    try:
        return ray.get(ref), None
    except Exception as err:  # the task's failure is the finding itself
        return None, _first_line(err)


def main(argv: Sequence[str]) -> int:
    """`python -m pathsearch.cluster.check inspect URI PATH`: the check job's entrypoint (one line of JSON)."""
    if argv[:1] == ["inspect"] and len(argv) == 3:
        print("CHECK " + json.dumps(inspect_cluster(argv[1], argv[2])), flush=True)
        return 0
    print("usage: python -m pathsearch.cluster.check inspect TRACKING_URI STORAGE_PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
