"""The public benchmarks (TOFU, WMDP questions and corpora, MUSE, MMLU; schemas in
``shared/DATASETS.md``), read from the Hugging Face hub when it is reachable, else from
local files of the same schema (``path=``, or ``$ALTER_DATA_DIR``)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import datasets

from alter.config import check_choice

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATA_DIR_ENV = "ALTER_DATA_DIR"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds: without this
    check, ``datasets`` retries for half a minute on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return True  # offline mode: datasets answers from its cache at once
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_data_files(path: Path, names: Sequence[str], what: str) -> list[Path]:
    """The data files of ``path``: the file itself, or, in a folder, for the first of
    ``names`` (relative, like ``"wmdp-bio/test"``) that matches: files named ``name.ext``
    or ``name-*.ext`` (hub shards, e.g. ``test-00000-of-00001.parquet``) and every data
    file under a folder ``name/``."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: local path {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    for name in names:
        folder, base = path / Path(name).parent, Path(name).name
        files = sorted(f for f in folder.glob("*") if f.is_file() and f.suffix in _LOCAL_FORMATS
                       and (f.stem == base or f.stem.startswith(base + "-")))
        if (folder / base).is_dir():
            files += sorted(f for f in (folder / base).rglob("*") if f.is_file() and f.suffix in _LOCAL_FORMATS)
        if files:
            return files
    tried = ", ".join(f"{n}.{{{','.join(e[1:] for e in _LOCAL_FORMATS)}}}" for n in names)
    raise FileNotFoundError(f"{what}: no data file in {str(path)!r} (looked for {tried}, or a folder of that name)")


def _load_local(path: Path, names: Sequence[str], what: str) -> datasets.Dataset:
    files = _local_data_files(path, names, what)
    formats = {_LOCAL_FORMATS.get(f.suffix) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"{what}: data files must share one format among "
                         f"{sorted(_LOCAL_FORMATS)}, got {[f.name for f in files]}")
    try:
        return datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as exc:
        # What datasets raises for files without rows varies by format (and by version).
        raise ValueError(f"{what}: no rows could be read from {[f.name for f in files]}: the dataset is "
                         f"empty or malformed ({type(exc).__name__}: {exc})") from exc


def _load(hub_name: str, config: str | None, split: str, path, names: Sequence[str],
          required: Sequence[str], what: str) -> datasets.Dataset:
    """A dataset from local files at ``path`` when given, else from the hub; when the hub
    cannot be reached, from ``$ALTER_DATA_DIR/<hub repo name>`` if that is set."""
    if path is not None:
        ds = _load_local(Path(path), names, what)
    else:
        error = None
        if hub_reachable():
            try:
                ds = datasets.load_dataset(hub_name, config, split=split)
            except (ConnectionError, OSError) as exc:  # datasets raises ConnectionError offline
                error = exc
        else:
            error = ConnectionError("the hub is not reachable")
        if error is not None:
            fallback = os.environ.get(DATA_DIR_ENV)
            if not fallback:
                raise ConnectionError(
                    f"{what}: could not load {hub_name!r} from the hub ({error}); pass path= to a "
                    f"local copy, or set {DATA_DIR_ENV} to a folder holding {hub_name.split('/')[-1]}/"
                ) from error
            ds = _load_local(Path(fallback) / hub_name.split("/")[-1], names, what)
    _check_schema(ds, required, what)
    return ds


def _check_schema(ds: datasets.Dataset, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing required column(s) {missing}; the columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{what}: the dataset is empty")


def _check_string_lists(ds: datasets.Dataset, column: str, what: str) -> None:
    """``column`` holds lists of strings (Arrow columns are typed: one check covers every
    row). A CSV column of one string each would otherwise be scored character by character."""
    feature = ds.features[column]
    if getattr(getattr(feature, "feature", None), "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"{what}: column {column!r} must hold lists of strings, got {feature}")


def load_tofu(config: str = "forget10", path=None, split: str = "train") -> datasets.Dataset:
    """A TOFU config (``locuslab/TOFU``): ``forget10``, ``retain90``, ``forget10_perturbed``,
    ``real_authors_perturbed``, ``world_facts_perturbed``, ... (see ``shared/DATASETS.md``).

    ``path``: a data file, or a folder holding ``{config}.json`` / ``.jsonl`` / ``.parquet`` /
    ``.csv`` (or a folder ``{config}/``), e.g. ``shared/data/tofu``. Columns: ``question``,
    ``answer``; perturbed configs add ``perturbed_answer`` (list of strings) and, except for
    real authors and world facts, ``paraphrased_answer``.
    """
    if not isinstance(config, str) or not config:
        raise ValueError(f"load_tofu: config must be a non-empty string, got {config!r}")
    required = ["question", "answer"]
    if config.endswith("_perturbed"):
        required.append("perturbed_answer")
        if not config.startswith(("real_authors", "world_facts")):
            required.append("paraphrased_answer")
    what = f"load_tofu({config!r})"
    ds = _load("locuslab/TOFU", config, split, path, [config, f"{config}/{split}"], required, what)
    if "perturbed_answer" in required:
        _check_string_lists(ds, "perturbed_answer", what)
    return ds


_WMDP_CONFIGS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")
_MCQ_COLUMNS = ("question", "choices", "answer")


def load_wmdp(config: str = "wmdp-bio", path=None, split: str = "test") -> datasets.Dataset:
    """WMDP multiple-choice questions (``cais/wmdp``): ``question``, ``choices`` (4 strings),
    ``answer`` (int 0-3). ``path``: a data file, or a folder holding ``{config}.*`` or the
    hub layout ``{config}/test-*.parquet``."""
    check_choice("config", config, _WMDP_CONFIGS, "load_wmdp")
    return _load("cais/wmdp", config, split, path, [f"{config}/{split}", config], _MCQ_COLUMNS,
                 f"load_wmdp({config!r})")


def load_wmdp_corpus(path) -> datasets.Dataset:
    """A WMDP forget or retain corpus (e.g. ``bio-forget-corpus.jsonl``; the bio forget
    corpus is gated, so it is read from a local file): JSON lines with a ``text`` field."""
    if path is None:
        raise ValueError("load_wmdp_corpus: path is required (a JSON lines file with a 'text' field)")
    what = f"load_wmdp_corpus({str(path)!r})"
    ds = _load_local(Path(path), [Path(path).name], what)
    _check_schema(ds, ["text"], what)
    return ds


_MUSE_SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}
_MUSE_COLUMNS = {"raw": ("text",), "verbmem": ("prompt", "gt"), "knowmem": ("question", "answer"),
                 "privleak": ("text",)}


def load_muse(corpus: str = "News", subset: str = "raw", split: str | None = None, path=None) -> datasets.Dataset:
    """A MUSE subset (``muse-bench/MUSE-News`` or ``MUSE-Books``).

    ``subset="raw"`` (splits forget, retain1, retain2, holdout; column ``text``),
    ``"verbmem"`` (split forget; ``prompt``, ``gt``), ``"knowmem"`` (splits forget_qa,
    retain_qa and their ``_icl`` sets; ``question``, ``answer``) or ``"privleak"`` (the
    membership-inference texts: splits forget, retain, holdout; ``text``). ``split=None`` is the
    subset's first split. ``path``: a data file, or a folder (the corpus) holding
    ``{subset}/{split}.*`` or hub shards ``{subset}/{split}-*.parquet``.
    """
    check_choice("corpus", corpus, ("News", "Books"), "load_muse")
    check_choice("subset", subset, tuple(_MUSE_SPLITS), "load_muse")
    split = _MUSE_SPLITS[subset][0] if split is None else split
    check_choice("split", split, _MUSE_SPLITS[subset], "load_muse")
    return _load(f"muse-bench/MUSE-{corpus}", subset, split, path, [f"{subset}/{split}"],
                 _MUSE_COLUMNS[subset], f"load_muse({corpus!r}, {subset!r}, {split!r})")


def load_mmlu(subject: str = "all", path=None, split: str = "test") -> datasets.Dataset:
    """MMLU (``cais/mmlu``): ``question``, ``subject``, ``choices`` (4), ``answer`` (int).

    ``path``: a data file, or a folder holding ``{subject}.*``, ``{subject}/test-*`` or,
    for one subject, the ``all`` files (then filtered to that subject).
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"load_mmlu: subject must be a non-empty string, got {subject!r}")
    names = [f"{subject}/{split}", subject] + (["all/" + split, "all"] if subject != "all" else [])
    what = f"load_mmlu({subject!r})"
    ds = _load("cais/mmlu", subject, split, path, names, _MCQ_COLUMNS + ("subject",), what)
    if subject != "all":
        ds = ds.filter(lambda row: row["subject"] == subject)
        _check_schema(ds, _MCQ_COLUMNS, f"{what} (rows of subject {subject!r})")
    return ds
