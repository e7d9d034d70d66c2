"""Reads an MLflow server with the real client and prints what tests check, as JSON. Tests run it inside the
cluster's network namespace, where the server's 127.0.0.1 is. Usage: python tests/cluster_probe.py URI EXPERIMENT"""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient


def main() -> None:
    uri, experiment = sys.argv[1], sys.argv[2]
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=10000) if found else []
    out = []
    for run in runs:
        tags = run.data.tags
        epochs = []
        if "mlflow.parentRunId" in tags:
            epochs = [int(m.step) for m in client.get_metric_history(run.info.run_id, "val_acc")]
        out.append(
            {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "parent": tags.get("mlflow.parentRunId"),
                "kind": tags.get("pathsearch.kind"),
                "role": tags.get("pathsearch.role"),
                "seed": tags.get("pathsearch.seed"),
                "trial_id": tags.get("pathsearch.trial_id"),
                "state": tags.get("pathsearch.state"),
                "retries": int(tags.get("pathsearch.retries", 0)),
                "node_id": tags.get("pathsearch.node_id"),
                "val_acc_steps": sorted(epochs),
                "metrics": run.data.metrics,
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
