"""Every deployment file in cluster/ parses, names its command in its first line and has what its kind needs.

A YAML document is known by its content: a Ray cluster launcher config (`provider`), a KubeRay resource
(`apiVersion: ray.io/...`), a Docker Compose file (`services`) or the PersistentVolumeClaim a RayCluster mounts.
A document of no known kind fails, so no deployment file goes unchecked. The checks run on text, so the last tests
can show each of them failing on a shipped file with one thing taken out. Two more checks read text the same way:
every command that cluster/, docs/cluster.md and the search files show runs with pathsearch's own parser, and every
search file's comments on packing trials onto GPUs agree with its keys and with the cluster files' GPU workers.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from pathsearch.cli import build_parser, flag_problems
from pathsearch.cluster import local as localcluster
from pathsearch.cluster.jobs import check_reachable_by_form
from pathsearch.cluster.placement import TOKEN_CPU

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
    ("cluster/kuberay/raycluster.yaml", ", nvidia.com/gpu: ", ", gpu: ", "nvidia.com/gpu"),  # every group's
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
    """Pairs (search file's trial, cluster file) where no worker of the cluster can take the whole trial: Tune would
    wait. A trial of `workers: N` is N times its resources and the Tune trial's token CPU, all on one node, so that
    its data-parallel workers talk within a node (Ray could spread them, but a shipped file should not need to)."""
    trial = dict(yaml.safe_load(search_text)["search"].get("resources_per_trial", {"cpu": 1}))
    workers = trial.pop("workers", 1)
    whole = {name: workers * amount for name, amount in trial.items()}
    if workers > 1:
        whole["cpu"] = whole.get("cpu", 0) + TOKEN_CPU
    problems = []
    for name, text in cluster_files.items():
        offers = [o for doc in yaml.safe_load_all(text) if doc is not None for o in worker_offers(doc)]
        if offers and not any(fits(whole, o) for o in offers):
            problems.append(f"{trial} x {workers} workers fits no worker of {name} ({offers})")
    return problems


CLUSTER_TEXTS = {rel(p): p.read_text() for p in YAML_FILES}


def test_cluster_files_describe_their_workers():
    offers = {name: [o for d in yaml.safe_load_all(t) if d is not None for o in worker_offers(d)]
              for name, t in CLUSTER_TEXTS.items()}  # fmt: skip
    assert offers["cluster/aws-gpu.yaml"] == [{"cpu": 8.0, "gpu": 1.0}, {"cpu": 48.0, "gpu": 4.0}]
    assert {"cpu": 8.0, "gpu": 1.0} in offers["cluster/kuberay/raycluster.yaml"]
    assert {"cpu": 40.0, "gpu": 4.0} in offers["cluster/kuberay/raycluster.yaml"]


@pytest.mark.parametrize("path", SEARCH_FILES, ids=lambda p: p.name)
def test_every_search_files_trial_fits_a_worker_of_every_cluster_file(path):
    assert unplaceable(path.read_text(), CLUSTER_TEXTS) == []


@pytest.mark.parametrize(
    "bigger", ["{cpu: 64, gpu: 1}", "{cpu: 12, gpu: 1, workers: 4}", "{cpu: 8, gpu: 1, workers: 6}"]
)
def test_a_trial_larger_than_every_worker_is_found(bigger):
    """A trial of one process larger than every node type; worker groups each of whose workers fits a node type, but
    not the whole group on one (4 x 12 CPUs leaves no room for the Tune trial's token CPU on 48; 6 GPUs on 4)."""
    text = (ROOT / "search_spaces/imagenet_deit_small.yaml").read_text()
    changed = re.sub(r"resources_per_trial: \{[^}]*\}", f"resources_per_trial: {bigger}", text)
    assert changed != text
    assert any("cluster/aws-gpu.yaml" in p for p in unplaceable(changed, CLUSTER_TEXTS))


# ----- every command the cluster files and docs show runs as written ---------------------------------------------
COMMAND_FILES = sorted(
    [p for p in CLUSTER.rglob("*") if p.is_file() and not p.name.startswith(".")]
    + [ROOT / "docs" / "cluster.md", *SEARCH_FILES]
)
PROGRAM = r"(?:(?:\S*/)?(?:pathsearch|local\.sh)|(?:\S*/)?python3? -m pathsearch\.(?:cli|localcluster))"
# pathsearch's verbs (`cluster`: announced, not in the parser yet) and local.sh's
PARSER_VERBS = re.search(r"\{([\w,-]+)\}", build_parser().format_usage())[1].split(",")
VERBS = "|".join(sorted({*PARSER_VERBS, "cluster", "up", "down", "status"}))
# `pathsearch VERB` where prose may hold a command (the lookbehind keeps `~/pathsearch` and `pathsearch.cli` out)
COMMAND_START = re.compile(rf"(?<![\w./~-]){PROGRAM}\s+(?:{VERBS})(?![\w.-])")
RUNS_PROGRAM = re.compile(rf"(?<![\w./~-]){PROGRAM}\s+[a-z]")  # in code any word may follow: a misspelt verb too
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
FENCE_LINE = re.compile(r"^ {0,3}(```|~~~)")
JOBS_API_VERBS = ("submit", "status", "logs", "stop")  # they reach the dashboard from this machine, with the token
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "~/.ray/auth_token")
SHELL_VARS = {"PWD": "/home/you/pathsearch", "HOME": "/home/you"}  # "$PWD/runs" is absolute when a shell runs it
NODES_ON_ONE_HOST = [{"node_ip": "127.0.0.1"}, {"node_ip": "127.0.0.1"}]  # refuses local stores, allows loopback


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its comment: `#` starts one at a word's start outside quotes (bash's rule)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def simple_commands(code: str) -> list[list[str]]:
    """The simple commands of one line of shell code: its words, cut at `&&`, `;`, `|`, `$(`, ..."""
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    commands: list[list[str]] = [[]]
    for word in lexer:
        if set(word) <= set("();<>|&$"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [words for words in commands if words]


def invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """("pathsearch" or "local.sh", its arguments) when the command's first word after VAR=value runs one."""
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        words = words[1:]
    if not words:
        return None
    first, rest = words[0], words[1:]
    if re.fullmatch(r"(\S*/)?python3?", first) and rest[:1] == ["-m"] and len(rest) > 1:
        module = {"pathsearch.cli": "pathsearch", "pathsearch.cluster.local": "local.sh"}.get(rest[1])
        return (module, rest[2:]) if module else None
    if first == "pathsearch" or first.endswith("/pathsearch"):
        return "pathsearch", rest
    if first.endswith("local.sh"):
        return "local.sh", rest
    return None


def cut_at_aside(text: str) -> str:
    """A command written in prose ends where an aside starts: two spaces then `(` or `#`, or a `)` it did not open."""
    text = re.split(r"\s{2,}(?=[(#])", text, maxsplit=1)[0]
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return text[:i]
    return text


def span_kind(span: str) -> str:
    """What a code span in prose is: a `mention` of a verb (`pathsearch submit`), a `fragment` (a usage synopsis, or
    a command with a part elided: `...`, `[--follow]`, `up|down|status`), a `command`, or `other` (no program)."""
    span = " ".join(span.split())
    if COMMAND_START.fullmatch(span):
        return "mention"
    if not re.match(rf"{PROGRAM}\s+\S", span):
        return "other"
    return "fragment" if re.search(r"\.\.\.|…|\s\[|\w\\?\|\w", span) else "command"


def found_in_prose(line: int, text: str, bare: bool = True) -> list[tuple[int, str, str]]:
    """(line, kind, text) of each command in prose: its code spans, then (in a comment) the commands written bare,
    each up to the comment's end or an aside."""
    found = []
    for match in CODE_SPAN.finditer(text):
        if (kind := span_kind(match[2])) != "other":
            found.append((line + text.count("\n", 0, match.start()), kind, " ".join(match[2].split())))
    rest = CODE_SPAN.sub(lambda m: " " * len(m[0]), text)
    starts = [m.start() for m in COMMAND_START.finditer(rest)] if bare else []
    for start, end in zip(starts, [*starts[1:], len(rest)][: len(starts)], strict=True):
        command = cut_at_aside(rest[start:end]).strip()
        kind = "fragment" if span_kind(command) == "fragment" else "command"  # a bare verb alone is checked too
        found.append((line + rest.count("\n", 0, start), kind, command))
    return found


def found_in_shell(line: int, text: str) -> list[tuple[int, str, str]]:
    """(line, kind, text) of each command in one logical line of shell code (continuations joined)."""
    code, comment = split_comment(text)
    return [*([(line, "shell", code)] if RUNS_PROGRAM.search(code) else []), *found_in_prose(line, comment)]


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines joined where one ends in a backslash, each with the number of its first line."""
    joined: list[tuple[int, str]] = []
    open_ = False
    for number, line in lines:
        if open_:
            joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + line.strip())
        else:
            joined.append((number, line.rstrip()))
        open_ = joined[-1][1].endswith("\\")
    return joined


def found_in_markdown(text: str) -> list[tuple[int, str, str]]:
    found, prose, fence, code = [], [], "", []
    for number, line in enumerate(text.splitlines(), 1):
        marker = FENCE_LINE.match(line)
        if marker and (not fence or marker[1] == fence):
            fence = "" if fence else marker[1]
            prose.append("")
        elif fence:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    for number, line in logical_lines(code):
        found += found_in_shell(number, line)
    return found + found_in_prose(1, "\n".join(prose), bare=False)  # prose outside code spans: the tripwire


def comment_of(line: str) -> str:
    """A YAML, shell or env line's comment (as code_part: no ` #` inside their values)."""
    stripped = line.lstrip()
    return stripped[1:] if stripped.startswith("#") else line.partition(" #")[2]


def found_in_config(text: str, is_yaml: bool) -> list[tuple[int, str, str]]:
    """Commands in a YAML, shell or Dockerfile's comments, and (YAML) in its string values (a RayJob entrypoint)."""
    comments = logical_lines([(number, comment_of(line)) for number, line in enumerate(text.splitlines(), 1)])
    found = [item for number, comment in comments for item in found_in_prose(number, comment)]
    if is_yaml:
        stack = list(yaml.compose_all(text))
        while stack:
            node = stack.pop()
            if isinstance(node, yaml.ScalarNode) and RUNS_PROGRAM.search(node.value):
                found += [(node.start_mark.line + 1, "shell", node.value)]
            elif isinstance(node, yaml.MappingNode):
                stack += [value for _, value in node.value]
            elif isinstance(node, yaml.SequenceNode):
                stack += node.value
    return found


def commands_in(name: str, text: str) -> list[tuple[int, str, str]]:
    """(line, kind, text) of every command, mention and fragment of pathsearch or local.sh in a file."""
    if name.endswith(".md"):
        return found_in_markdown(text)
    return found_in_config(text, is_yaml=name.endswith((".yaml", ".yml")))


@functools.cache
def flags_of(verb: str) -> frozenset[str]:
    """The flags `pathsearch VERB --help` lists, spelt in full."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([verb, "--help"])
    return frozenset(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.getvalue()))


def expand(word: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARS.get(m[1], m[0]), word)


def pathsearch_problems(argv: list[str], doc: str) -> list[str]:
    """What stops `pathsearch ARGV` from running as written in a doc whose whole text is `doc`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return [f"does not parse: {err.getvalue().strip().splitlines()[-1]}"]
    given = {word.partition("=")[0] for word in argv if word.startswith("--")}
    problems = flag_problems(args)
    problems += [f"{flag} is not a flag of `pathsearch {args.verb}` (spell it in full)"
                 for flag in sorted(given - flags_of(args.verb))]  # fmt: skip
    if args.verb in JOBS_API_VERBS:
        if args.address is None and "RAY_ADDRESS" not in doc:
            problems.append("no --address, and the doc never says RAY_ADDRESS")
        if not any(source in doc for source in TOKEN_SOURCES):
            problems.append("the doc never says where the token comes from (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    # a search on a cluster (submitted, or run there with --address) must name where everyone records and stores
    if (args.verb == "submit" and args.resume is None) or (args.verb == "search" and args.address is not None):
        missing = [flag for flag in ("--tracking-uri", "--storage-path") if flag not in given]
        problems += [f"no {flag}" for flag in missing]
        if not missing:
            problems += check_reachable_by_form(args.tracking_uri, args.storage_path, NODES_ON_ONE_HOST)
    return problems


def local_sh_problems(argv: list[str]) -> list[str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            localcluster.build_parser().parse_args(argv)
    except SystemExit:
        return [f"does not parse: {err.getvalue().strip().splitlines()[-1]}"]
    return []


def command_problems(name: str, text: str) -> list[str]:
    """Every command of pathsearch or local.sh in the file `name` whose content is `text` that would not run as
    written: `FILE:LINE: problem: command` each."""
    found = commands_in(name, text)
    problems = []
    read, written = sum(len(COMMAND_START.findall(c)) for *_, c in found), len(COMMAND_START.findall(text))
    if read < written:  # e.g. a command in Markdown prose outside a code span
        problems.append(f"{name}: holds `pathsearch VERB` {written} times, but the checker read {read} of them")
    for line, kind, command in found:
        if kind in ("mention", "fragment"):
            continue
        where = f"{name}:{line}"
        try:
            runs = [run for words in simple_commands(command) if (run := invocation(words))]
        except ValueError as err:  # shlex: an unclosed quote
            problems.append(f"{where}: {err}: {command}")
            continue
        if len(runs) < len(COMMAND_START.findall(command)):
            problems.append(f"{where}: a command the checker cannot read (not the first word of a simple command): "
                            f"{command}")  # fmt: skip
        for program, args in runs:
            words = [expand(word) for word in args]
            wrong = pathsearch_problems(words, text) if program == "pathsearch" else local_sh_problems(words)
            problems += [f"{where}: {problem}: {command}" for problem in wrong]
    return problems


def test_the_command_finder_finds_commands_in_every_kind_of_file():
    found = {rel(p): [c for c in commands_in(rel(p), p.read_text()) if c[1] != "mention"] for p in COMMAND_FILES}
    # the submit examples of each walkthrough, the RayJob's entrypoint, and a search file's header
    assert sum("pathsearch submit" in c for _, _, c in found["cluster/README.md"]) >= 4
    assert sum("pathsearch submit" in c for _, _, c in found["docs/cluster.md"]) >= 1
    assert [kind for _, kind, c in found["cluster/kuberay/rayjob.yaml"] if "--address auto" in c] == ["shell"]
    assert any(c.startswith("pathsearch submit FILE") for _, _, c in found["cluster/aws-gpu.yaml"])
    assert any("pathsearch search" in c for _, _, c in found["search_spaces/cifar10_deit_tiny.yaml"])


@pytest.mark.parametrize("path", COMMAND_FILES, ids=rel)
def test_every_command_in_the_cluster_files_and_docs_runs_as_written(path):
    """Each command of pathsearch (`pathsearch`, `.venv/bin/pathsearch`, `python -m pathsearch.cli`) or of
    `cluster/local.sh` that a cluster file, docs/cluster.md or a search file shows parses with the CLI's own parser
    and passes its flag checks, spells every flag in full, and: a `submit` (of a file) or a `search` on a cluster
    (with --address) names --tracking-uri and --storage-path in a form every node can use; a command that reaches
    the Jobs API (submit, status, logs, stop) names --address (or its doc says RAY_ADDRESS), and its doc says where
    the token comes from (RAY_AUTH_TOKEN or ~/.ray/auth_token). $PWD and $HOME stand for absolute paths.

    What counts as a command, read as text: in Markdown, each simple command of a fenced code block (backslash
    continuations joined; cut at &&, ;, |) whose first word after VAR=value is the program, whatever word follows
    it, and each code span in prose; in other files, the same in every YAML string value (a RayJob entrypoint),
    and in every comment (`#` lines joined across a trailing backslash) its code spans and each `pathsearch VERB`
    written bare, up to the comment's end or an aside (two spaces and `(` or `#`, or a `)` it did not open).
    Skipped: a code span that only names a verb (`pathsearch submit`) and a fragment, one that elides part of a
    command (`...`, an optional `[--flag]`, alternatives `up|down|status`). A `pathsearch VERB` the checker does not
    read as a command (in Markdown prose outside a code span, or not the first word of its simple command) fails,
    so none is skipped silently. Not found: a bare command with a misspelt verb in a comment (it reads as prose).
    """
    assert command_problems(rel(path), path.read_text()) == []


# Each case changes one command of a shipped file; the check must then report it (and name the line).
BROKEN_COMMANDS = [
    ("cluster/README.md", "--storage-path s3://BUCKET/runs --wait", "--wait", "README.md:61: no --storage-path"),
    (
        "cluster/kuberay/rayjob.yaml",
        "    --storage-path /mnt/shared/pathsearch/runs\n",
        "",
        "rayjob.yaml:17: no --storage-path",
    ),
    (
        "cluster/aws-gpu.yaml",
        "--storage-path /mnt/shared/pathsearch/runs --wait",
        "--storge-path /m --wait",
        "aws-gpu.yaml:13: does not parse: pathsearch: error: unrecognized arguments: --storge-path",
    ),
    (
        "docs/cluster.md",
        "--tracking-uri http://127.0.0.1:5000 --storage-path",
        "--tracking-url http://127.0.0.1:5000 --storage-path",
        "cluster.md:11: does not parse: pathsearch: error: unrecognized arguments: --tracking-url",
    ),
    ("cluster/README.md", "--storage-path s3://BUCKET/runs", "--storage s3://BUCKET/runs", "spell it in full"),
    ("docs/cluster.md", '"$PWD/runs/cluster/runs"', "runs/cluster/runs", "a relative path"),
    (
        "cluster/README.md",
        "--tracking-uri http://127.0.0.1:5000 --storage-path s3:",
        "--tracking-uri sqlite:///m.db --storage-path s3:",
        "a local MLflow store",
    ),
    ("cluster/README.md", "pathsearch stop JOB --address http://127.0.0.1:8265", "pathsearch stop JOB", "no --address"),
    ("cluster/kuberay/raycluster.yaml", "RAY_AUTH_TOKEN", "THE_TOKEN", "where the token comes from"),
    ("docs/cluster.md", "cluster/local.sh up --workers 2", "cluster/local.sh up --wrokers 2", "--wrokers"),
    (
        "search_spaces/digits_tiny.yaml",
        "pathsearch train search_spaces/digits_tiny.yaml)",
        "pathsearch train)",
        "digits_tiny.yaml:1: does not parse",
    ),
    ("cluster/README.md", "pathsearch stop JOB", "time pathsearch stop JOB", "the checker cannot read"),
    ("cluster/README.md", "pathsearch stop JOB", "pathsearch sotp JOB", "invalid choice: 'sotp'"),
    ("docs/cluster.md", "Trials that were running", "Run pathsearch status JOB there. Trials", "the checker read"),
]


@pytest.mark.parametrize(("name", "old", "new", "expected"), BROKEN_COMMANDS, ids=[c[3] for c in BROKEN_COMMANDS])
def test_command_check_reports_a_shipped_command_with_one_thing_changed(name, old, new, expected):
    text = (ROOT / name).read_text()
    assert old in text, f"{name} no longer holds {old!r}: update this case"
    assert command_problems(name, text) == []
    problems = command_problems(name, text.replace(old, new))
    assert any(expected in problem for problem in problems), problems


# ----- every shipped search file's comments on concurrency agree with its keys and the cluster files -------------
# "{cpu: 1, gpu: 0.125} packs 8 trials on each GPU", "gpu: 0.25 packs 4 trials per GPU"
PACKING = re.compile(r"(\{[^{}]*\bgpu:[^{}]*\}|\bgpu:\s*[\d.]+),?\s+packs\s+(\d+)\s+trials?\s+(?:on\s+each|per)\s+GPU")
CAP_LINE = re.compile(r"^[ \t]+max_concurrent_trials:[ \t]*([^#\s]*)[ \t]*(?:#(.*))?$", re.M)


def concurrency_problems(text: str, cluster_files: dict[str, str]) -> list[str]:
    """Where a search file's comments on packing trials onto a GPU disagree with its keys, with arithmetic, or with
    the shipped cluster files' GPU workers: `line N: problem` each."""
    search = yaml.safe_load(text)["search"]
    trial = search.get("resources_per_trial", {"cpu": 1})
    confirm = search.get("confirm") or {}
    caps = {
        "search.max_concurrent_trials": search.get("max_concurrent_trials"),
        "search.confirm.max_concurrent_trials": confirm.get("max_concurrent_trials"),
    }
    gpu_workers = {name: o for name, t in cluster_files.items() for d in yaml.safe_load_all(t) if d is not None
                   for o in worker_offers(d) if o.get("gpu")}  # fmt: skip
    lines = text.splitlines()
    problems = []
    if "max_concurrent_trials" not in search:
        problems.append("search: no max_concurrent_trials: say whether it caps trials (null: unset, and why)")
    for match in CAP_LINE.finditer(text):
        if match[1] in ("null", "~", "") and not (match[2] or "").strip():
            number = text.count("\n", 0, match.start()) + 1
            problems.append(f"line {number}: max_concurrent_trials unset with no comment saying what runs instead")
    claims = [(n, yaml.safe_load(m[1]), int(m[2])) for n, line in enumerate(lines, 1)
              for m in PACKING.finditer(comment_of(line))]  # fmt: skip
    if 0 < trial.get("gpu", 0) < 1:  # the keys' own packing
        at = re.search(r"^\s+resources_per_trial:", text, re.M)
        claims.append((text.count("\n", 0, at.start() if at else 0) + 1, trial, None))
    for number, resources, n in claims:
        share = float(resources.get("gpu", 0))
        packs = math.floor(1 / share + 1e-9) if 0 < share <= 1 else 0
        if n is not None and n != packs:
            problems.append(f"line {number}: {resources} packs {packs} trials on each GPU, not {n}")
        n = packs if n is None else n
        for name, offer in gpu_workers.items():
            cpus_per_gpu, cpus = offer.get("cpu", 0) / offer["gpu"], n * float(resources.get("cpu", 1))
            if cpus > cpus_per_gpu:
                problems.append(
                    f"line {number}: {n} trials of {resources} on a GPU need {cpus:g} CPUs, "
                    f"a GPU worker of {name} has {cpus_per_gpu:g}"
                )
        for key, cap in caps.items():
            if cap is not None and cap < n:
                problems.append(f"line {number}: {key} = {cap} caps the {n} trials on each GPU that {resources} packs")
    return problems


@pytest.mark.parametrize("path", SEARCH_FILES, ids=lambda p: p.name)
def test_every_search_files_concurrency_comments_agree_with_its_keys(path):
    """A packing a comment states (`{cpu: 1, gpu: 0.125} packs 8 trials on each GPU`) and one the keys ask for (a
    GPU share in resources_per_trial) is floor(1/share) trials, fits the CPUs of every shipped GPU worker, and no
    max_concurrent_trials (search or confirm) caps it; every file states max_concurrent_trials, an unset one (null)
    with a comment on its line."""
    assert concurrency_problems(path.read_text(), CLUSTER_TEXTS) == []


CAP = re.compile(r"^  max_concurrent_trials:.*$", re.M)
BROKEN_CONCURRENCY = [  # (file, pattern, replacement, expected)
    ("fashion_mnist_vit.yaml", CAP, "  max_concurrent_trials: 2", "= 2 caps the 8 trials on each GPU"),  # the old file
    ("fashion_mnist_vit.yaml", re.compile("packs 8 trials"), "packs 4 trials", "packs 8 trials on each GPU, not 4"),
    ("fashion_mnist_vit.yaml", re.compile(r"\{cpu: 1, gpu: 0.125\}"), "gpu: 0.25", "packs 4 trials on each GPU, not 8"),
    (
        "fashion_mnist_vit.yaml",
        re.compile(r"\{cpu: 1, gpu: 0.125\} packs"),
        "{cpu: 2, gpu: 0.125} packs",
        "need 16 CPUs",
    ),
    (
        "digits_tiny.yaml",
        re.compile(r"resources_per_trial: \{cpu: 1\}"),
        "resources_per_trial: {cpu: 1, gpu: 0.25}",
        "= 2 caps the 4 trials",
    ),
    ("cifar10_deit_tiny.yaml", CAP, "  max_concurrent_trials: null", "unset with no comment"),
    ("cifar10_deit_tiny.yaml", CAP, "", "no max_concurrent_trials"),
]


@pytest.mark.parametrize(
    ("name", "pattern", "new", "expected"), BROKEN_CONCURRENCY, ids=[c[3] for c in BROKEN_CONCURRENCY]
)
def test_concurrency_check_reports_a_shipped_search_file_with_one_thing_changed(name, pattern, new, expected):
    text = (ROOT / "search_spaces" / name).read_text()
    assert pattern.search(text), f"{name} no longer matches {pattern.pattern!r}: update this case"
    problems = concurrency_problems(pattern.sub(new, text), CLUSTER_TEXTS)
    assert any(expected in problem for problem in problems), problems
