"""The path ensemble in tensors: path names and PathConfig (paths), the path-ensemble ViT on timm (model) and its
pretrained weights (weights), per-path scores (scoring, analysis), the path supernet (supernet) and its proxy scorer
(proxy). Torch, timm and numpy only (and timm's huggingface_hub, for its cache): never Ray, Optuna or MLflow, and no
other layer of pathsearch but the search-file schema (config).
"""
