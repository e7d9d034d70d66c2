"""Every deployment file in cluster/ parses, names its command in its first line and has what its kind needs.

A YAML document is known by its content: a Ray cluster launcher config (`provider`), a KubeRay resource
(`apiVersion: ray.io/...`), a Docker Compose file (`services`) or the PersistentVolumeClaim a RayCluster mounts.
A document of no known kind fails, so no deployment file goes unchecked. The checks run on text, so the last tests
can show each of them failing on a shipped file with one thing taken out.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted({*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")})
DOCKERFILES = sorted(p for p in CLUSTER.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))
ENV_EXAMPLE = CLUSTER / "mlflow" / "env.example"
COMMAND = {"launcher": "ray up", "kuberay": "kubectl apply", "pvc": "kubectl apply", "compose": "docker compose"}
# Keys a user must edit, by kind: each line that sets one carries a `# CHANGE:` comment.
MUST_CHANGE = {
    "launcher": ("region", "availability_zone", "ImageId"),
    "kuberay": ("image",),
    "pvc": ("storageClassName",),
}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
REQUIRED_REFERENCE = re.compile(r"\$\{(\w+):\?[^}]+\}")  # ${VAR:?message}: compose stops when VAR is unset
URL_CREDENTIALS = re.compile(r"://[^\s:/@]+:([^\s@]+)@")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def kind_of(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "unknown"
    if "provider" in doc:
        return "launcher"
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    if "services" in doc:
        return "compose"
    if doc.get("apiVersion") == "v1" and doc.get("kind") == "PersistentVolumeClaim":
        return "pvc"
    return "unknown"


def dig(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def check_launcher(doc: dict[str, Any]) -> list[str]:
    problems = []
    if not doc.get("cluster_name"):
        problems.append("no cluster_name")
    if not dig(doc, "provider.type"):
        problems.append("no provider.type")
    types = doc.get("available_node_types")
    if not isinstance(types, dict) or not types:
        problems.append("no available_node_types")
        types = {}
    head = doc.get("head_node_type")
    for name, node in types.items():
        if not isinstance(node, dict) or not isinstance(node.get("resources"), dict):
            problems.append(f"node type {name}: no resources")
        elif "node_config" not in node:
            problems.append(f"node type {name}: no node_config")
        elif name != head and not {"min_workers", "max_workers"} <= node.keys():
            problems.append(f"node type {name}: no min_workers/max_workers")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not in available_node_types")
    setup = doc.get("setup_commands") or []
    if not any(re.search(r"\bpip install\b.*pathsearch", str(command)) for command in setup):
        problems.append("setup_commands do not pip install pathsearch")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [str(command) for command in doc.get(key) or [] if "ray start" in str(command)]
        if not starts:
            problems.append(f"{key}: no `ray start`")
        if any("RAY_AUTH_MODE=token" not in command for command in starts):
            problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
    head_starts = [str(c) for c in doc.get("head_start_ray_commands") or [] if "ray start" in str(c)]
    if any("--dashboard-host=127.0.0.1" not in command for command in head_starts):
        problems.append("the dashboard is not bound to 127.0.0.1 (--dashboard-host=127.0.0.1)")
    head_cpus = dig(types.get(head), "resources.CPU")
    if head_cpus != 0 and not any("--num-cpus=0" in command for command in head_starts):
        problems.append("trials may land on the head: give it resources {CPU: 0} or --num-cpus=0")
    if "~/.ray/auth_token" not in (doc.get("file_mounts") or {}):
        problems.append("file_mounts do not ship ~/.ray/auth_token")
    return problems


def check_ray_cluster_spec(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where} missing"]
    problems = []
    head, workers = spec.get("headGroupSpec"), spec.get("workerGroupSpecs")
    if not isinstance(head, dict):
        problems.append(f"{where}.headGroupSpec missing")
    if not isinstance(workers, list) or not workers:
        problems.append(f"{where}.workerGroupSpecs missing")
        workers = []
    token_by_operator = dig(spec, "authOptions.mode") == "token"
    has_gpu_workers = False
    for group_name, group in [("headGroupSpec", head), *((f"workerGroupSpecs[{i}]", w) for i, w in enumerate(workers))]:
        containers = dig(group, "template.spec.containers")
        if not isinstance(containers, list) or not containers:
            problems.append(f"{where}.{group_name}: no template.spec.containers")
            continue
        for container in containers:
            name = f"{where}.{group_name} container {container.get('name')}"
            if not container.get("image"):
                problems.append(f"{name}: no image")
            env = {item.get("name"): item for item in container.get("env") or []}
            if not token_by_operator and dig(env.get("RAY_AUTH_MODE"), "value") != "token":
                problems.append(f"{name}: token auth is off (no authOptions.mode token, no RAY_AUTH_MODE=token)")
            for var, item in env.items():
                if CREDENTIAL_NAME.search(str(var)) and "value" in item:
                    problems.append(f"{name}: {var} has a literal value (use valueFrom.secretKeyRef)")
            has_gpu_workers |= group_name != "headGroupSpec" and "nvidia.com/gpu" in (
                dig(container, "resources.limits") or {}
            )
    if not has_gpu_workers:
        problems.append(f"{where}: no worker group with an nvidia.com/gpu limit")
    return problems


def check_kuberay(doc: dict[str, Any]) -> list[str]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        return check_ray_cluster_spec(spec, "spec")
    if kind == "RayJob":
        problems = (
            [] if "pathsearch search" in str(spec.get("entrypoint")) else ["entrypoint is not `pathsearch search`"]
        )
        if "rayClusterSpec" in spec:
            return problems + check_ray_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
        return problems + ([] if spec.get("clusterSelector") else ["neither rayClusterSpec nor clusterSelector"])
    return [f"KubeRay kind {kind!r} is neither RayCluster nor RayJob"]


def host_ip(port: Any) -> str | None:
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else None  # "5000:5000" and "5000" publish on every interface


def check_compose(doc: dict[str, Any]) -> list[str]:
    services = doc.get("services") or {}
    problems = [f"no {name} service" for name in ("postgres", "mlflow") if name not in services]
    command = dig(services, "mlflow.command") or ""
    command = " ".join(map(str, command)) if isinstance(command, list) else str(command)
    problems += [
        f"the mlflow command does not use {scheme}" for scheme in ("postgresql://", "s3://") if scheme not in command
    ]
    for password in URL_CREDENTIALS.findall(command):
        if not REQUIRED_REFERENCE.fullmatch(password):
            problems.append("the mlflow command has a literal password in a URI")
    for name, service in services.items():
        for port in (service or {}).get("ports") or []:
            if host_ip(port) != "127.0.0.1":
                problems.append(f"service {name} publishes {port!r} beyond 127.0.0.1")
        env = (service or {}).get("environment") or {}
        pairs = env.items() if isinstance(env, dict) else (str(item).partition("=")[::2] for item in env)
        for var, value in pairs:
            if CREDENTIAL_NAME.search(str(var)) and not REQUIRED_REFERENCE.fullmatch(str(value)):
                problems.append(f"service {name}: {var} is not a ${{VAR:?...}} reference")
    return problems


def check_pvc(doc: dict[str, Any]) -> list[str]:
    return [] if "ReadWriteMany" in (dig(doc, "spec.accessModes") or []) else ["the volume claim is not ReadWriteMany"]


CHECKS = {"launcher": check_launcher, "kuberay": check_kuberay, "compose": check_compose, "pvc": check_pvc}


def kinds_in(text: str) -> list[str]:
    return [kind_of(doc) for doc in yaml.safe_load_all(text) if doc is not None]


def problems_in(name: str, text: str) -> list[str]:
    """Everything wrong with the YAML file `name` (its path from the repo root) whose content is `text`."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        return [f"does not parse: {err}"]
    if not docs:
        return ["holds no YAML document"]
    problems = []
    kinds = [kind_of(doc) for doc in docs]
    for i, (doc, kind) in enumerate(zip(docs, kinds, strict=True)):
        if kind == "unknown":
            problems.append(f"document {i}: no known kind (launcher, KubeRay, compose, volume claim); add a check")
        else:
            problems += [f"document {i} ({kind}): {problem}" for problem in CHECKS[kind](doc)]
    first = text.splitlines()[0]
    commands = {COMMAND[kind] for kind in kinds if kind in COMMAND}
    if not first.startswith("#") or name not in first or not all(command in first for command in commands):
        problems.append(f"first line is not a comment giving the command ({' / '.join(sorted(commands))} {name})")
    problems += marker_problems(text, kinds)
    return problems


def code_part(line: str) -> str:
    """A YAML or env line without its comment (good enough for these files: no ` #` inside their values)."""
    return "" if line.lstrip().startswith("#") else line.split(" #", 1)[0]


def marker_problems(text: str, kinds: list[str]) -> list[str]:
    lines = text.splitlines()
    problems = []
    for number, line in enumerate(lines, 1):
        if "# CHANGE:" in line and not code_part(line).strip():
            problems.append(f"line {number}: a `# CHANGE:` comment that marks no key or value")
    for key in {key for kind in kinds for key in MUST_CHANGE.get(kind, ())}:
        setting = [(n, line) for n, line in enumerate(lines, 1) if re.match(rf"\s*(- )?{key}:", code_part(line))]
        if not setting:
            problems.append(f"no {key} key to mark")
        problems += [f"line {n}: {key} is not marked `# CHANGE:`" for n, line in setting if "# CHANGE:" not in line]
    for number, line in enumerate(lines, 1):
        if "CHANGE-ME" in code_part(line) and not marked_here_or_above(lines, number - 1):
            problems.append(f"line {number}: a CHANGE-ME placeholder under no `# CHANGE:` key")
    return problems


def marked_here_or_above(lines: list[str], index: int) -> bool:
    """Whether the line or one of the keys it sits under (by indentation) carries `# CHANGE:`."""
    if "# CHANGE:" in lines[index]:
        return True
    indent = len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        here = len(line) - len(line.lstrip())
        if code_part(line).strip() and here < indent:
            if "# CHANGE:" in line:
                return True
            indent = here
    return False


def test_cluster_folder_has_yaml_files():
    assert YAML_FILES, "cluster/ holds no YAML file"


def test_cluster_folder_ships_every_kind():
    kinds = {kind for path in YAML_FILES for kind in kinds_in(path.read_text())}
    assert {"launcher", "kuberay", "compose"} <= kinds


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_cluster_yaml_names_its_command_and_has_what_its_kind_needs(path):
    assert problems_in(rel(path), path.read_text()) == []


@pytest.mark.parametrize("path", [p for p in YAML_FILES if "launcher" in kinds_in(p.read_text())], ids=rel)
def test_launcher_config_passes_ray_own_validation(path):
    # Ray's own schema for `ray up` (private API of the installed Ray: a Ray upgrade that moves it fails here).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))


@pytest.mark.parametrize("path", DOCKERFILES, ids=rel)
def test_dockerfile_names_its_build_command_and_has_a_base(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and "docker build" in lines[0]
    assert any(line.startswith("FROM ") for line in lines)


def test_node_image_installs_pathsearch_on_the_ray_of_the_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version('ray'))}-py311-gpu$", text, re.MULTILINE)
    assert re.search(r"^COPY .*\bpathsearch /app/pathsearch$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install .*/app$", text, re.MULTILINE)


def test_cluster_files_name_the_installed_ray_and_mlflow_versions():
    texts = {rel(p): p.read_text() for p in sorted(CLUSTER.rglob("*")) if p.is_file() and p.suffix != ".md"}
    ray_images = {m for text in texts.values() for m in re.findall(r"rayproject/ray:([\d.]+)-", text)}
    ray_versions = {m for text in texts.values() for m in re.findall(r"rayVersion: \"?([\d.]+)", text)}
    mlflow_pins = {m for text in texts.values() for m in re.findall(r"mlflow==([\d.]+)", text)}
    assert ray_images and ray_versions and mlflow_pins
    assert ray_images | ray_versions == {version("ray")}
    assert mlflow_pins == {version("mlflow")}


def test_env_example_gives_a_placeholder_for_every_variable_the_compose_file_needs():
    lines = ENV_EXAMPLE.read_text().splitlines()
    assert lines[0].startswith("#") and "cp cluster/mlflow/env.example cluster/mlflow/.env" in lines[0]
    example = dict(code_part(line).strip().partition("=")[::2] for line in lines if code_part(line).strip())
    compose = (CLUSTER / "mlflow" / "docker-compose.yaml").read_text()
    required = set(REQUIRED_REFERENCE.findall(compose))
    assert required and required <= example.keys()
    assert set(re.findall(r"\$\{(\w+)", compose)) <= example.keys()
    assert all(example[var] == "CHANGE-ME" for var in required)
    assert all("# CHANGE:" in line for line in lines if code_part(line).strip().partition("=")[0] in required)


# Each case takes one thing out of a shipped file; the check named must then report it.
BROKEN = [
    ("cluster/aws-gpu.yaml", "RAY_AUTH_MODE=token ray start --address", "ray start --address", "RAY_AUTH_MODE=token"),
    ("cluster/aws-gpu.yaml", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0", "127.0.0.1"),
    ("cluster/aws-gpu.yaml", "pip install --no-cache-dir ~/pathsearch", "echo none", "pip install pathsearch"),
    ("cluster/aws-gpu.yaml", '"~/.ray/auth_token": "~/.ray/auth_token"', "", "auth_token"),
    ("cluster/aws-gpu.yaml", "head_node_type: head", "head_node_type: boss", "head_node_type"),
    ("cluster/aws-gpu.yaml", "# CHANGE: your AWS region", "", "region is not marked"),
    ("cluster/aws-gpu.yaml", "# Start: ray up", "# Start:", "first line"),
    ("cluster/kuberay/raycluster.yaml", "mode: token", "mode: disabled", "token auth is off"),
    ("cluster/kuberay/raycluster.yaml", "nvidia.com/gpu: 1}", "}", "nvidia.com/gpu"),
    ("cluster/kuberay/raycluster.yaml", "ReadWriteMany", "ReadWriteOnce", "ReadWriteMany"),
    ("cluster/kuberay/rayjob.yaml", "pathsearch search", "python train.py", "entrypoint"),
    ("cluster/kuberay/rayjob.yaml", "image: CHANGE-ME/pathsearch:latest   # CHANGE: the same", "#", "no image"),
    ("cluster/mlflow/docker-compose.yaml", '"127.0.0.1:5000:5000"', '"5000:5000"', "beyond 127.0.0.1"),
    ("cluster/mlflow/docker-compose.yaml", "s3://mlflow-artifacts", "/mlartifacts", "s3://"),
    ("cluster/mlflow/docker-compose.yaml", "${POSTGRES_PASSWORD:?set", "${POSTGRES_PASSWORD:-set", "reference"),
    ("cluster/mlflow/docker-compose.yaml", "mlflow:\n    build", "tracker:\n    build", "no mlflow service"),
]


@pytest.mark.parametrize(("name", "old", "new", "expected"), BROKEN, ids=[f"{n}:{e}" for n, _, _, e in BROKEN])
def test_checks_report_a_shipped_file_with_one_thing_taken_out(name, old, new, expected):
    text = (ROOT / name).read_text()
    assert old in text, f"{name} no longer holds {old!r}: update this case"
    problems = problems_in(name, text.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def test_a_yaml_file_of_no_known_kind_fails():
    assert any("no known kind" in p for p in problems_in("cluster/x.yaml", "# Start: kubectl apply -f x\nfoo: 1\n"))


# ----- every shipped search file's trial fits a worker of every shipped cluster file ------------------------------
SEARCH_FILES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def worker_offers(doc: Any) -> list[dict[str, float]]:
    """What one worker node of a launcher config or a KubeRay resource offers Ray: {"cpu": n, "gpu": n}."""
    kind = kind_of(doc)
    if kind == "launcher":
        head = doc.get("head_node_type")
        nodes = doc.get("available_node_types") or {}
        return [
            {name.lower(): float(v) for name, v in (node.get("resources") or {}).items()}
            for key, node in nodes.items()
            if key != head
        ]
    if kind != "kuberay":
        return []
    spec = doc.get("spec") or {}
    spec = spec.get("rayClusterSpec", spec)  # a RayJob holds its cluster's spec
    offers = []
    for group in spec.get("workerGroupSpecs") or []:
        params = group.get("rayStartParams") or {}
        limits = dig(group, "template.spec.containers")[0].get("resources", {}).get("limits", {})
        cpu = params.get("num-cpus", limits.get("cpu", 0))
        gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        offers.append({"cpu": float(str(cpu).rstrip("m")) / (1000 if str(cpu).endswith("m") else 1), "gpu": float(gpu)})
    return offers


def fits(trial: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(name, 0.0) >= amount for name, amount in trial.items())


def unplaceable(search_text: str, cluster_files: dict[str, str]) -> list[str]:
    """Pairs (search file's trial, cluster file) where no worker of the cluster can take the trial: Tune would wait."""
    trial = yaml.safe_load(search_text)["search"].get("resources_per_trial", {"cpu": 1})
    problems = []
    for name, text in cluster_files.items():
        offers = [o for doc in yaml.safe_load_all(text) if doc is not None for o in worker_offers(doc)]
        if offers and not any(fits(trial, o) for o in offers):
            problems.append(f"{trial} fits no worker of {name} ({offers})")
    return problems


CLUSTER_TEXTS = {rel(p): p.read_text() for p in YAML_FILES}


def test_cluster_files_describe_their_workers():
    offers = {name: [o for d in yaml.safe_load_all(t) if d is not None for o in worker_offers(d)]
              for name, t in CLUSTER_TEXTS.items()}  # fmt: skip
    assert offers["cluster/aws-gpu.yaml"] == [{"cpu": 8.0, "gpu": 1.0}]
    assert {"cpu": 8.0, "gpu": 1.0} in offers["cluster/kuberay/raycluster.yaml"]


@pytest.mark.parametrize("path", SEARCH_FILES, ids=lambda p: p.name)
def test_every_search_files_trial_fits_a_worker_of_every_cluster_file(path):
    assert unplaceable(path.read_text(), CLUSTER_TEXTS) == []


def test_a_trial_larger_than_every_worker_is_found():
    text = (ROOT / "search_spaces/imagenet_deit_small.yaml").read_text()
    bigger = re.sub(r"resources_per_trial: \{[^}]*\}", "resources_per_trial: {cpu: 10, gpu: 1}", text)
    assert bigger != text
    assert any("cluster/aws-gpu.yaml" in p for p in unplaceable(bigger, CLUSTER_TEXTS))
