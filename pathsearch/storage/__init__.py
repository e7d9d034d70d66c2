"""Where a search keeps its state: a local folder, or any URI that pyarrow's filesystems open (s3://bucket/prefix,
gs://bucket/prefix, ...). Endpoints and credentials come from each store's own environment variables (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; for GCS:
GOOGLE_APPLICATION_CREDENTIALS), never from a search file, a URI, a log line or MLflow.

With a URI, the run folder `<URI>/<name>` lives in the store, and this machine keeps a working copy of it
(`local_copy`). Tune writes its own part (experiment state, trial checkpoints) to the store itself. pathsearch's
files (the search file, the state file, the confirmation's plan, the results) are written to the working copy and
uploaded right after (`upload`); the Optuna journal, which Optuna appends to all the time, is uploaded with each of
Tune's experiment snapshots (searcher.PathOptunaSearch.save), so that the store is never more than one snapshot
behind. `download_run` makes a fresh working copy from the store: `resume URI` on a machine that never saw the run.
The copy is only a cache: the live search that uses it holds its lock (workcopy.py), and a finished search removes it.

Handwritten because pyarrow has no notion of a query string that must survive joining paths, nor of a preflight
with a deadline; the reading and writing itself is pyarrow's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

SECRET_KEYS = ("access_key", "secret_key", "session_token")  # pyarrow reads these from an s3:// query string
SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}  # pyarrow.fs.FileSystem.from_uri's object stores
CHECK_TIMEOUT_S = 30.0  # how long the preflight waits for the store; env PATHSEARCH_STORAGE_TIMEOUT_S
T = TypeVar("T")


def is_remote(path: str | Path) -> bool:
    """True for a URI of an object store (s3://, gs://, ...); False for a folder or a file:// URI."""
    scheme = urllib.parse.urlsplit(str(path)).scheme
    return len(scheme) > 1 and scheme.lower() != "file"  # "C:" is a drive, not a scheme


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path; a query string (?endpoint_override=...) stays at the end."""
    split = urllib.parse.urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urllib.parse.urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def name_of(uri: str) -> str:
    """The last part of a URI's path (a run's name)."""
    return urllib.parse.urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1]


def parent_of(uri: str) -> str:
    split = urllib.parse.urlsplit(uri)
    path = split.path.rstrip("/").rsplit("/", 1)[0]
    return urllib.parse.urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def local_problems(path: str | Path, flag: str = "--storage-path") -> list[str]:
    """What stops a local storage path from holding run folders: it, or a folder above it, is a file."""
    local = Path(path).expanduser()
    existing = next((p for p in [local, *local.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == local else f"is under {existing}, a file"
        return [f"{flag} {path}: {what}; run folders go in a folder"]
    return []


def check_form(uri: str, flag: str = "--storage-path") -> None:
    """What can be told from a store URI alone, without contacting the store (pyarrow asks S3 for a bucket's
    region when it opens an s3:// URI without one): a scheme pyarrow's filesystems open, no credentials in it."""
    split = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(split.query)
    # "@" after the scheme: user:secret@bucket (a secret with "/" in it hides the "@" from urlsplit's netloc)
    if "@" in uri.partition("://")[2].partition("?")[0] or any(k in query for k in SECRET_KEYS):
        raise ValueError(
            f"{flag} {_redact(uri)}: credentials in the URI end up in logs and MLflow; set them in the store's "
            "environment variables instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://)"
        )
    if split.scheme.lower() not in SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise ValueError(f"{flag} {uri}: pyarrow cannot open {split.scheme}:// URIs (it opens {known} and folders)")


def filesystem(uri: str, flag: str = "--storage-path") -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a store URI; ValueError naming the URI when pyarrow cannot open it or
    it carries credentials."""
    import pyarrow.fs

    check_form(uri, flag)
    split = urllib.parse.urlsplit(uri)
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow's ArrowInvalid / OSError: an unknown scheme, a filesystem it cannot load
        why = _first_line(err)
        raise ValueError(f"{flag} {uri}: pyarrow cannot open {split.scheme}:// URIs here ({why})") from None


def check(uri: str, flag: str = "--storage-path", timeout_s: float | None = None) -> None:
    """Proves that the store at `uri` can be written and read, before any trial starts: the bucket exists, the
    credentials are accepted, the endpoint answers (within `timeout_s`). ValueError with one line otherwise."""
    import pyarrow.fs

    fs, root = filesystem(uri, flag)
    bucket = root.split("/", 1)[0]
    probe = f"{root.rstrip('/')}/.pathsearch-probe-{uuid.uuid4().hex}"

    def attempt() -> None:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(f"the bucket {bucket!r} does not exist (or these credentials cannot see it)")
        with fs.open_output_stream(probe) as out:
            out.write(b"pathsearch")
        with fs.open_input_stream(probe) as src:
            if src.read() != b"pathsearch":
                raise OSError("what was written there reads back differently")
        fs.delete_file(probe)

    timeout = float(os.environ.get("PATHSEARCH_STORAGE_TIMEOUT_S", CHECK_TIMEOUT_S)) if timeout_s is None else timeout_s
    try:
        _with_deadline(attempt, timeout)
    except TimeoutError:
        why = f"the store did not answer within {timeout:.0f}s (endpoint: {_endpoint()})"
        raise ValueError(f"{flag} {uri}: {why}") from None
    except Exception as err:  # whatever the store answered is the finding: unreachable, refused, missing
        raise ValueError(f"{flag} {uri}: cannot write there: {_first_line(err)}") from None


def exists(location: str) -> bool:
    """True when a file or folder is at `location` (a local path or a store URI)."""
    import pyarrow.fs

    if not is_remote(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return bool(fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound)


def read_text(location: str) -> str:
    """The text of the file at `location` (a local path or a store URI)."""
    if not is_remote(location):
        return Path(location).read_text()
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as src:
        return bytes(src.read()).decode()


def fetch(location: str, names: Iterable[str], dest: Path) -> list[Path]:
    """Copies the files `names` that exist in the folder at `location` (a local path or a store URI) into the
    folder `dest`; returns the copies."""
    return [dest / name for name in names if copy_out(location, name, dest / name)]


def copy_out(location: str, name: str, target: Path) -> bool:
    """Copies the file `name` of the folder at `location` to `target`; False when there is no such file."""
    import pyarrow.fs

    if not is_remote(location):
        if not (Path(location) / name).is_file():
            return False
        shutil.copy(Path(location) / name, target)
        return True
    fs, path = filesystem(join(location, name))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    pyarrow.fs.copy_files(path, str(target), source_filesystem=fs)
    return True


@contextmanager
def local_folder(location: str) -> Iterator[Path]:
    """The folder at `location` as a local folder: itself, or a temporary copy of a folder in a store."""
    import pyarrow.fs

    if not is_remote(location):
        yield Path(location)
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="pathsearch-") as tmp:
        pyarrow.fs.copy_files(path, tmp, source_filesystem=fs)
        yield Path(tmp)


def checkpoint_location(checkpoint: Any) -> str:
    """Where a Tune checkpoint lives: a local path, or a URI when Tune keeps it in an object store."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return str(checkpoint.path)
    scheme = {"gcs": "gs"}.get(checkpoint.filesystem.type_name, checkpoint.filesystem.type_name)
    return f"{scheme}://{checkpoint.path}"


GROUP_CHECKPOINT = "group_checkpoint"  # a data-parallel trial's metric: its checkpoint's place in Ray Train's storage


def result_checkpoint(checkpoint: Any, metrics: Mapping[str, Any] | None) -> str | None:
    """Where a trial's (last) checkpoint lives: Tune's checkpoint, or for a data-parallel trial, whose checkpoints
    Ray Train keeps, the place its last report named (GROUP_CHECKPOINT); None when it has none."""
    if checkpoint is not None:
        return checkpoint_location(checkpoint)
    return (metrics or {}).get(GROUP_CHECKPOINT)


def restorable(experiment: str) -> bool:
    """Whether Tune can restore `experiment` (a folder or URI): `Tuner.can_restore` and an experiment snapshot
    (`experiment_state-*.json`). A driver killed between creating its Tuner and Tune's first snapshot leaves a folder
    that `Tuner.can_restore` accepts (its tuner.pkl) but nothing to restore from."""
    import pyarrow.fs
    from ray import tune

    if not tune.Tuner.can_restore(experiment):
        return False

    fs, path = filesystem(experiment) if is_remote(experiment) else (pyarrow.fs.LocalFileSystem(), str(experiment))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return any(i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json") for i in infos)


def recover_checkpoints(experiment: str) -> list[str]:
    """Before Tune restores `experiment` (a folder or URI): every trial checkpoint its stored snapshot names exists.

    Tune deletes a trial's older checkpoint as soon as it registers a newer one, while the experiment snapshot
    that names the newer one is still being uploaded in the background. A driver killed in between leaves a
    snapshot that names a deleted checkpoint, and Tune fails that trial on every retry ("does not exist on storage
    anymore"): a confirmation lost a seed that way. The checkpoint Tune had registered is moved to the place the
    snapshot names, so the trial continues from where it really was (pathsearch's checkpoints carry their own
    epoch; a trial restored at its last epoch reports it again: runner.train_trial). That is the oldest one after
    the named one, not the newest: a trial killed with the driver may have left a newer checkpoint half written
    (Tune registers one only once it is stored whole, and stores one at a time per trial). Handwritten: Tune has
    no repair for its own snapshot. Returns the ids of the trials whose checkpoint was moved.
    """
    import posixpath

    import pyarrow.fs
    from ray.tune import ExperimentAnalysis

    moved = []
    for trial in ExperimentAnalysis(experiment).trials:
        named = trial.checkpoint
        if named is None:
            continue
        fs: Any = named.filesystem  # a pyarrow filesystem (Ray's annotation allows None)
        path = named.path
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            continue
        selector = pyarrow.fs.FileSelector(posixpath.dirname(path), allow_not_found=True)
        later = [  # Tune's names (checkpoint_000007) sort by their index
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.base_name > posixpath.basename(path)
        ]
        if not later:  # nothing to continue from: Tune fails the trial, as before
            continue
        registered = min(later)
        fs.create_dir(path)
        pyarrow.fs.copy_files(registered, path, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(registered)
        moved.append(trial.trial_id)
        print(
            f"pathsearch: trial {trial.trial_id}: Tune's last snapshot named a checkpoint it had already replaced; "
            f"it continues from the one that replaced it ({posixpath.basename(registered)})",
            flush=True,
        )
    return moved


# ----- a run folder in a store, and this machine's working copy of it ------------------------------------------
def run_uri(run_dir: Path, state: Mapping[str, Any]) -> str:
    """Where the run folder lives: `<storage>/<name>` in a store, or the local run directory (Tune's experiments
    of the confirmation and the supernet are folders in it)."""
    return join(state["storage"], state["name"]) if state.get("storage") else str(run_dir)


def tune_root(run_dir: Path, state: Mapping[str, Any]) -> str:
    """The storage path of the search's own Tune experiment (named after the run): the store, or the local
    run directory's parent (the experiment is the run directory itself)."""
    return str(state["storage"]) if state.get("storage") else str(run_dir.parent)


def local_copy(name: str) -> Path:
    """This machine's working copy of a run kept in a store: `$PATHSEARCH_WORK_DIR/<name>`, by default under
    ~/.cache/pathsearch/runs. Only a cache: the store holds everything a resume needs. The live search that uses it
    holds its lock (workcopy.claim); a finished search removes it."""
    root = os.environ.get("PATHSEARCH_WORK_DIR") or Path.home() / ".cache" / "pathsearch" / "runs"
    return Path(root).expanduser().resolve() / name


def upload(run_dir: Path, state: Mapping[str, Any], names: Iterable[str] | None = None) -> None:
    """Uploads pathsearch's files of the working copy (`names`, or every file at its top level) to the run folder
    in the store; nothing for a local run."""
    import pyarrow.fs

    if not state.get("storage"):
        return
    chosen = sorted(p.name for p in run_dir.iterdir() if p.is_file() and not _tunes(p.name)) if names is None else names
    for name in chosen:
        if (run_dir / name).is_file():
            fs, path = filesystem(join(run_uri(run_dir, state), name))
            pyarrow.fs.copy_files(str(run_dir / name), path, destination_filesystem=fs)


def download_run(uri: str) -> Path:
    """A fresh working copy of the run folder at `uri`, claimed by this process (workcopy.claim): pathsearch's files
    at its top level (Tune reads its experiment state and trial folders from the store itself, and an old copy of
    them here must never be uploaded back). ValueError when it is not there, or when a live process holds the copy."""
    import pyarrow.fs

    fs, path = filesystem(uri, "resume")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
    except FileNotFoundError:
        raise ValueError(f"{uri}: no such run folder in the store") from None
    except OSError as err:
        raise ValueError(f"{uri}: cannot read the store: {_first_line(err)}") from None
    from pathsearch.storage.workcopy import InUse, claim  # stdlib only: the lock that names its process

    try:
        copy = claim(local_copy(name_of(uri)))  # until the search ends (search.py releases it)
    except InUse as err:
        raise ValueError(f"{uri}: {err}; wait for it to end") from None
    try:
        copy.clear()  # the store is the truth: a copy here, stale or kept, is not used
        for info in infos:
            if info.type == pyarrow.fs.FileType.File and not _tunes(info.base_name):
                pyarrow.fs.copy_files(info.path, str(copy.path / info.base_name), source_filesystem=fs)
    except BaseException:
        copy.release()
        raise
    return copy.path


def _tunes(name: str) -> bool:
    """Tune's own files at the top of an experiment folder (its state, searcher and callback snapshots, marker)."""
    prefixes = ("experiment_state", "basic-variant-state", "search_gen_state")  # the last one: a pickle
    return name.startswith(".") or name.endswith(".pkl") or name.startswith(prefixes)


@contextmanager
def tune_settings(store: str | None) -> Iterator[None]:
    """Tune's settings for a search kept in an object store (nothing changes for a local one).

    Tune uploads its whole snapshot folder on every experiment snapshot (no diff), and a snapshot is forced after
    each trial checkpoint (one kept per trial). Its default per-trial loggers put four files per trial there
    (result.json, progress.csv, params.json/.pkl, TensorBoard events), so the uploads per snapshot grew with the
    number of trials: 47,000 requests for the 22 trials of the digits demo, which then took 1.7x as long as with
    a local folder. MLflow records every metric those files hold, so they are not written.
    """
    if not store:
        yield
        return
    saved = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # Tune reads it when a Tuner starts its run
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = saved


# ----- helpers -------------------------------------------------------------------------------------------------
def _with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """fn() in a daemon thread; TimeoutError when it has not returned after `timeout_s` (pyarrow's own retries to
    an endpoint that does not answer can take minutes; the thread is left to end on its own)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box.get("value")  # type: ignore[return-value]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the store's default"


def _redact(uri: str) -> str:
    """The URI without anything before its last "@" (credentials) and without its query."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.partition('?')[0].rpartition('@')[2]}"
