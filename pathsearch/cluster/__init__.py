"""The door to Ray clusters: Ray Jobs (jobs: submit, follow, stop), the report before a first submission (check),
the local cluster of `cluster/local.sh` (local) and trial placement with an autoscaler (placement). Ray is imported
inside the functions that need it, so the client side stays quick.
"""
