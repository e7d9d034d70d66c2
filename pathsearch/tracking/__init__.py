"""The one door to MLflow: nothing else in pathsearch imports mlflow.

- runs.py: runs as plain data. `Store` reads a tracking store (runs, artifacts) and writes runs; `SearchRuns` is a
  search's parent run and everything nested under it (stage-1 records, confirmation runs, summaries, plots).
- logger.py: the Ray Tune callback that logs every trial as a run nested under its search, through an ordered
  queue that survives an outage of the tracking server.
- tags.py: the tags every run carries and how a trial's run is found by them (imports nothing; runs.py re-exports
  the tags).
- outage.py: the rules for a server that is down or slow (fail-fast requests, retries until a deadline).
- registry.py and path_vit_model.py: a confirmed winner in MLflow's Model Registry, loaded with
  `mlflow.pyfunc.load_model` (models from code: no pickled weights).

The submodules are imported by name (`from pathsearch.tracking.runs import Store`): this file imports nothing, so
reading runs (`pathsearch ui`, `export`) does not import Ray.
"""
