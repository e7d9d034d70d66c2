"""A path-ensemble ViT as an MLflow pyfunc model, logged as code (MLflow's "models from code"): the registered model
holds this file, the PathConfig YAML and the weights as safetensors, never a pickle. `mlflow.pyfunc.load_model`
runs this file, then `load_context` rebuilds the model exactly as `create_path_vit` + the exported weights do.

MLflow imports this file when the model is logged and when it is loaded: nothing may happen at import but the
definition and `set_model`.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class PathViTModel(PythonModel):
    """Images (N, C, H, W) float32 in, logits (N, classes) out, on the CPU."""

    def load_context(self, context: Any) -> None:
        from safetensors.torch import load_file

        from pathsearch.config.paths import PathConfig
        from pathsearch.ensemble.model import create_path_vit

        self.model = create_path_vit(path_config=PathConfig.load(context.artifacts["path_config"]))
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import torch

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(images).numpy()


mlflow.models.set_model(PathViTModel())
