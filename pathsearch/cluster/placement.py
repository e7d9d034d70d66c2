"""Whether a Ray cluster can hold a search's trials, and asking its autoscaler for them.

A cluster without an autoscaler (a local Ray, workers started by hand) is judged by its live nodes: a trial no node
holds would stay pending for ever, so it is refused (a cluster first gets a minute for nodes that are joining).

A cluster with an autoscaler (the cluster launcher, KubeRay) may have no worker at all when a search starts. There the
search asks the autoscaler for its trials' bundles (`ray.autoscaler.sdk.request_resources`: up to
max_concurrent_trials of them, so workers start together instead of one per pending trial) and judges a trial against
the node types the autoscaler may start. Autoscaler v2 publishes those types: a trial none of them holds is refused at
once. Autoscaler v1 (the cluster launcher's and the fake provider's default) publishes none and does not report a
placement group's demand as infeasible: there the search waits up to `search.autoscaler_wait_min` for a node that
holds a trial, and gives up when the autoscaler launched nothing for it (or what it launched never joined).

A trial of `workers: N` (N > 1) is a Ray Train worker group: N bundles of the per-worker resources, placed PACK or
SPREAD, plus TOKEN_CPU that the Tune trial driving them reserves for itself. Both strategies are best effort (Ray
spans nodes, or doubles up on one, when it must), so such a trial fits when some node holds one worker and the nodes
together hold all N and the token; an autoscaler's node types, which it may start again and again, need only hold
one worker and the token.

`request_resources` is one request for the whole cluster, replaced by each call. So each search keeps its bundles in
Ray's internal key-value store under its own key, and the request sent is always the union of the live ones: two
searches on one cluster keep each other's, and the entry of a driver that died (kill -9) is dropped by the next
pathsearch command that connects to the cluster.

Imports Ray lazily; no torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NAMESPACE = "pathsearch"  # Ray internal KV: this package's keys, apart from Ray's own
REQUEST_PREFIX = "autoscaler_request/"  # + the search's name: {"job": driver job id, "bundles": [...]}
JOIN_WAIT_S = 60.0  # a cluster without an autoscaler: how long nodes that are joining may take to show
POLL_S = 1.0
# The Tune trial's own reservation when it drives a worker group (workers > 1): Tune cannot see the resources the
# group's placement group takes, and refuses a trial that reserves nothing.
TOKEN_CPU = 0.01


def ray_resources(ask: Mapping[str, float]) -> dict[str, float]:
    """resources_per_trial's names (cpu, gpu, custom) as Ray names them (CPU, GPU, custom), without `workers`: with
    workers > 1, one worker's resources."""
    from pathsearch.config import worker_resources

    return {name.upper() if name in ("cpu", "gpu") else name: amount for name, amount in worker_resources(ask).items()}


def shape(bundle: Mapping[str, float]) -> str:
    """A bundle as the console says it: {CPU: 8, GPU: 1}."""
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in bundle.items()) + "}"


def holds(node: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())


def unplaceable(ask: Mapping[str, float], nodes: Sequence[Mapping[str, float]], repeat: bool = False) -> str | None:
    """Why `nodes` (Ray's resources of each) cannot hold one trial of `ask` (resources_per_trial's names), or None.

    One worker: some node must hold it all. A worker group (workers > 1): some node must hold one worker, and the
    nodes together all of them and the token (see the module's docstring). `repeat`: each node may be started again
    and again (an autoscaler's node types), so one worker and the token on some node each is enough."""
    from pathsearch.config import trial_workers

    want, workers = ray_resources(ask), trial_workers(ask)
    each = f" for each of its {workers} workers" if workers > 1 else ""
    if not any(holds(node, want) for node in nodes):
        most = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in want}
        short = [f"{name} {amount:g} (the most any node has: {most[name]:g})" for name, amount in want.items()]
        return f"it asks {', '.join(short)}{each}"
    if workers == 1 or _holds_group(want, workers, nodes, repeat):
        return None
    held = sum(_count(node, want) for node in nodes)
    left = f"{held} of those workers" + (", and no CPU for the trial itself" if held >= workers else "")
    return (
        f"it is a group of {workers} workers of {shape(want)} (search.resources_per_trial.workers: {workers}) "
        f"and CPU {TOKEN_CPU:g} for the trial itself; the nodes together hold {left}"
    )


def _count(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of `bundle` the node holds (a bundle that asks nothing: as many as anyone asks)."""
    counts = (int(node.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items() if amount > 0)
    return min(counts, default=2**31)


def _holds_group(bundle: Mapping[str, float], workers: int, nodes: Sequence[Mapping[str, float]], repeat: bool) -> bool:
    """Whether `nodes` hold `workers` copies of `bundle` and the token at once: the token on one node, the workers
    wherever room is left."""
    token = {"CPU": TOKEN_CPU}
    if repeat:
        return any(holds(node, token) for node in nodes)
    for i, node in enumerate(nodes):
        if holds(node, token):
            left = [{**n, "CPU": n.get("CPU", 0.0) - TOKEN_CPU} if j == i else n for j, n in enumerate(nodes)]
            if sum(_count(n, bundle) for n in left) >= workers:
                return True
    return False


@dataclass
class Demand:
    """What a search (or a resumed one) needs from the cluster: one bundle per trial shape, how many trials of the
    first shape run at once, and how many workers each of those has (each a bundle of the first shape)."""

    name: str  # the search's name: its key for the autoscaler request
    shapes: list[dict[str, float]]  # Ray resource names; [0]: a search trial's (one worker's), then the supernet's
    concurrent: int
    workers: int = 1  # search.resources_per_trial.workers

    @property
    def trial(self) -> list[dict[str, float]]:
        """One search trial's bundles: its own, or with workers > 1 the token and one bundle per worker."""
        if self.workers == 1:
            return [self.shapes[0]]
        return [{"CPU": TOKEN_CPU}, *[self.shapes[0]] * self.workers]

    @property
    def bundles(self) -> list[dict[str, float]]:
        return self.trial * self.concurrent + self.shapes[1:]

    def __str__(self) -> str:
        extra = "".join(f" and 1 of {shape(s)}" for s in self.shapes[1:])
        what = shape(self.shapes[0]) if self.workers == 1 else f"{self.workers} workers of {shape(self.shapes[0])}"
        return f"{self.concurrent} trial{'s' if self.concurrent != 1 else ''} of {what}{extra}"


# ----- the autoscaler ---------------------------------------------------------------------------------------
@dataclass
class Autoscaler:
    """The cluster's autoscaler as a driver sees it: its version and, where it publishes them (v2), the node types it
    may start (name -> resources)."""

    version: int
    node_types: dict[str, dict[str, float]] | None = None

    def type_list(self) -> str:
        if not self.node_types:
            return "none"
        return "; ".join(f"{name} {shape(res)}" for name, res in self.node_types.items())


def find_autoscaler(wait_s: float = 10.0) -> Autoscaler | None:
    """The connected cluster's autoscaler, or None when it has none that can start nodes.

    The node types come from the cluster config Ray keeps in its GCS, where the autoscaler publishes it (KubeRay's
    autoscaler v2 does; v1 never does). v2 is told by Ray itself (`is_autoscaler_v2`). v1 runs in the head's monitor
    process, which writes a status report every few seconds; on a cluster without an autoscaler the same monitor
    mirrors the live nodes with a read-only provider whose node types are named `node_<node id>` (Ray's
    format_readonly_node_type), so a report whose types are all of that form is no autoscaler. `wait_s`: how long to
    wait for a monitor that has not reported yet (just started)."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    read_config = getattr(ray._private.state.state, "get_cluster_config", None)  # (not in every Ray >= 2.40)
    config = read_config() if read_config is not None else None
    types = None
    if config is not None:
        types = {g.name: dict(g.resources) for g in config.node_group_configs if g.max_count != 0}
    if is_autoscaler_v2(fetch_from_server=True):
        return Autoscaler(2, types)
    deadline = time.monotonic() + wait_s
    while True:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        mapping = report.get("node_type_mapping") or {}
        if mapping:
            readonly = all(kind == f"node_{node}" for node, kind in mapping.items())
            return None if readonly else Autoscaler(1, types)
        if time.monotonic() >= deadline:
            return None  # no monitor report: nothing that could start a node
        time.sleep(0.5)


def launch_report() -> dict[str, Any]:
    """The v1 autoscaler's last report (pending launches and nodes, failed nodes), {} when there is none."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return dict((json.loads(raw) if raw else {}).get("autoscaler_report") or {})


def launched(scaler: Autoscaler) -> bool:
    """Whether the autoscaler is launching (or has tried to launch) any node: v1 from its report, v2 from Ray's
    cluster status."""
    if scaler.version == 2:
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.experimental.internal_kv import internal_kv_get_gcs_client

        status = get_cluster_status(internal_kv_get_gcs_client().address)
        return bool(status.pending_launches or status.pending_nodes or status.failed_launches or status.failed_nodes)
    report = launch_report()
    return bool(report.get("pending_launches") or report.get("pending_nodes") or report.get("failed_nodes"))


# ----- the cluster-wide request -----------------------------------------------------------------------------
def _kv() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put

    return _internal_kv_get, _internal_kv_put, _internal_kv_del, _internal_kv_list


def _dead_jobs() -> set[str]:
    import ray

    return {job["JobID"] for job in ray._private.state.state.job_table() if job["IsDead"]}


def send_requests() -> list[dict[str, float]]:
    """Sends the union of the live searches' bundles as the cluster's autoscaler request (dropping entries of
    drivers that died); returns what was sent ([] clears the request)."""
    from ray.autoscaler.sdk import request_resources

    get, _, delete, keys = _kv()
    dead = _dead_jobs()
    bundles: list[dict[str, float]] = []
    for key in keys(REQUEST_PREFIX, namespace=NAMESPACE):
        raw = get(key, namespace=NAMESPACE)
        entry = json.loads(raw) if raw else None
        if entry is None or entry.get("job") in dead:
            delete(key, namespace=NAMESPACE)
            continue
        bundles += entry["bundles"]
    request_resources(bundles=bundles)
    return bundles


def ask_autoscaler(demand: Demand) -> None:
    """Adds this search's bundles to the cluster's request (kept under its name until `release`)."""
    import ray

    _, put, _, _ = _kv()
    entry = {"job": ray.get_runtime_context().get_job_id(), "bundles": demand.bundles}
    put(REQUEST_PREFIX + demand.name, json.dumps(entry), overwrite=True, namespace=NAMESPACE)
    send_requests()


def release(name: str) -> None:
    """Takes this search's bundles out of the cluster's request (the other searches' stay)."""
    import ray

    if not ray.is_initialized():
        return
    _, _, delete, _ = _kv()
    delete(REQUEST_PREFIX + name, namespace=NAMESPACE)
    send_requests()


def tidy_requests() -> None:
    """Drops requests left by drivers that died, when the cluster has an autoscaler (any pathsearch command that
    connects to a cluster calls it)."""
    _, _, _, keys = _kv()
    if keys(REQUEST_PREFIX, namespace=NAMESPACE):
        send_requests()


# ----- the check before a search starts ---------------------------------------------------------------------
@dataclass
class Placement:
    """The outcome of `prepare`: whether an autoscaler request is held (released by `release`)."""

    demand: Demand
    requested: bool = False

    def release(self) -> None:
        if self.requested:
            release(self.demand.name)
            self.requested = False


def _live_nodes() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def prepare(
    demand: Demand,
    address: str | None,
    wait_min: float,
    say: Callable[[str], None] = print,
    join_s: float = JOIN_WAIT_S,
) -> Placement:
    """Makes sure the connected Ray can run the demand's trials before a search starts, asking its autoscaler for
    them where it has one. Raises ValueError (one line, nothing left requested) when it cannot:
    - no autoscaler: no live node holds a trial (a local Ray at once; a cluster after `join_s` for nodes joining);
    - autoscaler v2: no node type it may start holds a trial (at once, naming the types);
    - autoscaler v1, or v2 that launched nothing it could use: no node that holds a trial joined in `wait_min`.
    A trial a live node already holds needs no wait; the request stays until `Placement.release` (the search's end),
    so the workers it started stay up for the confirmation too."""
    place = Placement(demand)
    missing = _missing(demand, _live_nodes())
    scaler = find_autoscaler() if address else None
    if scaler is not None:
        tidy_requests()
    if scaler is None:
        if missing is not None:
            _wait_for_join(demand, address, missing, join_s, say)
        return place
    if scaler.node_types is not None:  # v2: the node types it may start are known
        refused = _missing(demand, list(scaler.node_types.values()) + _live_nodes(), repeat=True)
        if refused is not None:
            raise ValueError(
                f"search.resources_per_trial: no node type of the cluster's autoscaler can hold a trial: {refused}; "
                f"its node types: {scaler.type_list()} (ask for less, or add a node type that has it)"
            )
    ask_autoscaler(demand)
    place.requested = True
    if missing is None:
        return place
    try:
        _wait_for_autoscaler(demand, scaler, wait_min, say)
    except BaseException:
        place.release()
        raise
    return place


def _missing(demand: Demand, nodes: list[dict[str, float]], repeat: bool = False) -> str | None:
    asks = [{**demand.shapes[0], "workers": demand.workers}, *demand.shapes[1:]]
    return next((why for ask in asks if (why := unplaceable(ask, nodes, repeat)) is not None), None)


def _wait_for_join(
    demand: Demand, address: str | None, missing: str, wait_s: float, say: Callable[[str], None]
) -> None:
    deadline = time.monotonic() + (wait_s if address else 0.0)
    said = False
    while True:
        missing_now = _missing(demand, _live_nodes())
        if missing_now is None:
            return
        if time.monotonic() >= deadline:
            where = "this machine's Ray" if not address else f"the Ray cluster at {address}"
            raise ValueError(
                f"search.resources_per_trial: no node of {where} can hold a trial: {missing_now}; ask for less, or "
                "add a node that has it (the search would wait for ever)"
            )
        if not said:
            say(f"pathsearch: no node can hold a trial yet ({missing}); waiting up to {wait_s:.0f} s")
            said = True
        time.sleep(2.0)


def _wait_for_autoscaler(demand: Demand, scaler: Autoscaler, wait_min: float, say: Callable[[str], None]) -> None:
    say(f"pathsearch: waiting for the autoscaler: {demand}; up to {wait_min:g} min (search.autoscaler_wait_min)")
    started = time.monotonic()
    seen_launch = False
    while True:
        if _missing(demand, _live_nodes()) is None:
            say(f"pathsearch: a worker that holds a trial joined after {time.monotonic() - started:.0f} s")
            return
        seen_launch = seen_launch or launched(scaler)
        if time.monotonic() - started >= wait_min * 60:
            types = (
                f"its node types could not be read (autoscaler v{scaler.version} did not publish them)"
                if scaler.node_types is None
                else f"its node types: {scaler.type_list()}"
            )
            what = (
                "it launched nodes, but none that holds a trial joined"
                if seen_launch
                else "it launched nothing for them"
            )
            raise ValueError(
                f"search.autoscaler_wait_min: {wait_min:g} min passed waiting for the autoscaler to start a worker "
                f"for {demand}: {what}; {types} (check the cluster's node types and its autoscaler's log, or wait "
                "longer)"
            )
        time.sleep(POLL_S)
