"""One trial: its data (data), its training (train.fit) and the trainable adapter Ray calls (trainable). Built on the
ensemble layer; only trainable.py knows Ray, and nothing here knows Optuna or MLflow.
"""
