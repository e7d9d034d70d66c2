"""What a driver sees of a Ray cluster, as one JSON line: `python tests/cluster_state.py ADDRESS WHAT`, WHAT one of
nodes (alive nodes: id, resources), request (the autoscaler request Ray holds and pathsearch's entries behind it),
autoscaler (pathsearch.cluster.placement.find_autoscaler); or acts as a search driver would on the autoscaler
request: ask NAME CPUS [WORKERS] (adds NAME's bundle, or with WORKERS a trial of that many workers of CPUS each,
prints the request, then waits until killed), release NAME, tidy (what any pathsearch command does on connecting);
or publishes node types as an autoscaler v2 does (publish JSON, unpublish). Run inside a test cluster's network
namespace."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import ray
from ray._private import ray_constants
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put

from pathsearch.cluster import placement

# where Ray keeps the cluster config an autoscaler publishes (what ray._private.state.get_cluster_config reads)
CONFIG_KEY = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
CONFIG_NAMESPACE = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE


def request() -> dict:
    raw = _internal_kv_get(ray_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    keys = _internal_kv_list(placement.REQUEST_PREFIX, namespace=placement.NAMESPACE)
    return {"sent": json.loads(raw) if raw else None, "entries": sorted(k.decode() for k in keys)}


def main(address: str, what: str, *args: str) -> None:
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    if what == "ask":
        workers = int(args[2]) if len(args) > 2 else 1
        placement.ask_autoscaler(placement.Demand(args[0], [{"CPU": float(args[1])}], 1, workers))
        print(json.dumps(request()), flush=True)
        time.sleep(3600)
    elif what == "release":
        placement.release(args[0])
        out = request()
    elif what == "tidy":
        placement.tidy_requests()
        out = request()
    elif what == "publish":  # node types {name: {resource: amount}} as KubeRay's autoscaler v2 reports them
        config = autoscaler_pb2.ClusterConfig()
        for name, resources in json.loads(args[0]).items():
            config.node_group_configs.add(name=name, resources=resources, max_count=2)
        _internal_kv_put(CONFIG_KEY, config.SerializeToString(), overwrite=True, namespace=CONFIG_NAMESPACE)
        out = placement.find_autoscaler().node_types
    elif what == "unpublish":
        _internal_kv_del(CONFIG_KEY, namespace=CONFIG_NAMESPACE)
        out = ray._private.state.state.get_cluster_config() is None
    elif what == "nodes":
        out = [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]
    elif what == "request":
        out = request()
    elif what == "autoscaler":
        found = placement.find_autoscaler()
        out = dataclasses.asdict(found) if found else None
    else:
        raise SystemExit(f"unknown WHAT {what!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
