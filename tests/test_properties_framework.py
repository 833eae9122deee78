"""Property-based fuzzing of what users hand the framework: forget/retain rows (every mix
of usable and unusable rows) and adapter directories (truncated, bit-flipped, reshaped,
renamed or edited files). Every case ends in a typed error that names the problem, or in
exactly the right result: never a crash, never a silent wrong load.

Bounded and reproducible: few examples, ``derandomize=True``, no deadline."""
import copy
import functools
import json
import os
import re
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from alter.cli import training_records
from alter.config import ADAPTER_CONFIG_NAME
from alter.data import IGNORE_INDEX
from alter.model import ADAPTER_WEIGHTS_NAME, alter_layers, apply_alter, is_patched, load_adapter, save_adapter
from alter.tiny import build_tokenizer
from alter.train import check_rows, encode_dataset
from test_model import alter_config, randomize_adapters, tiny_model

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ rows

USABLE = st.sampled_from(["Oslo", "the year 1961 .", "  Lima  ", "x"])
UNUSABLE = st.one_of(
    st.none(), st.just(""), st.sampled_from([" ", "\n\t ", "\u3000"]), st.integers(-3, 3), st.floats(allow_nan=True),
    st.booleans(), st.lists(st.just("a"), max_size=2), st.dictionaries(st.just("k"), st.just("v"), max_size=1),
)
FIELD = st.one_of(USABLE, UNUSABLE)
ROW = st.fixed_dictionaries({}, optional={"question": FIELD, "answer": FIELD, "text": FIELD, "id": st.integers(0, 9)})


def blank(value) -> bool:
    return not isinstance(value, str) or not value.strip()


def row_defect(row: dict) -> bool:
    """The documented rule, written out: a QA row (question or answer given) needs both as
    non-blank strings; otherwise the row needs a non-blank string text."""
    if row.get("question") is not None or row.get("answer") is not None:
        return blank(row.get("question")) or blank(row.get("answer"))
    return blank(row.get("text"))


@functools.lru_cache(maxsize=None)
def word_tokenizer():
    return build_tokenizer(["Question: Answer: Oslo the year 1961 . Lima x"])


def check_outcome(rows: list[dict], error: Exception | None, prefix: str = "") -> None:
    """``error`` (None: no error) is right for ``rows``: the first defective row named, with a field."""
    first_bad = next((i for i, row in enumerate(rows) if row_defect(row)), None)
    if first_bad is None:
        assert error is None or "the rows do not form a table" in str(error), error
        return
    assert isinstance(error, ValueError), f"rows {rows} gave {error!r}"
    match = re.match(re.escape(prefix) + r"forget\[(\d+)\]: (.*)", str(error))
    assert match and int(match.group(1)) == first_bad, (str(error), rows)
    assert re.search(r"'(question|answer|text)'", match.group(2)), str(error)


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_row_validation_names_the_first_bad_row_or_accepts_all(rows):
    try:
        kinds = check_rows(rows, "forget")
    except ValueError as exc:
        check_outcome(rows, exc)
        return
    check_outcome(rows, None)
    assert kinds == ["qa" if r.get("question") is not None or r.get("answer") is not None else "text" for r in rows]


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_jsonl_reader_rejects_bad_rows_or_encodes_every_row_as_its_kind(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "forget.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        try:
            table = training_records(path, "forget")
        except ValueError as exc:
            check_outcome(rows, exc, prefix=f"{path}: ")
            return
    check_outcome(rows, None)
    examples = encode_dataset(word_tokenizer(), table, "forget", None)
    for row, example in zip(rows, examples):
        labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
        if row.get("question") is not None:  # the answer and EOS learned, the prompt not
            assert example["labels"][0] == IGNORE_INDEX and len(labelled) >= 2
        else:  # a text row: every token learned
            assert example["labels"] == example["input_ids"]


# ------------------------------------------------------------------- adapter files


@functools.lru_cache(maxsize=None)
def saved_adapter():
    """A base model, the bytes of an adapter saved for it, and the adapter's tensors and config."""
    torch.manual_seed(0)
    base = tiny_model()
    model = apply_alter(copy.deepcopy(base), alter_config(r=2, num_experts=3, k_high=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, 0.5)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder)
        files = {name: open(os.path.join(folder, name), "rb").read() for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)}
    tensors = {f"{name}.{s}": layer.get_parameter(s).detach().clone()
               for name, layer in alter_layers(model).items() for s in ("lora_A", "lora_B", "router.weight", "router.entropy_weight")}
    return base, files, tensors, model.alter_config


def flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= 1 << bit
    return bytes(out)


def edited_config(text: bytes, key: str, value) -> bytes:
    values = json.loads(text)
    values[key] = value
    return json.dumps(values).encode()


def resaved_weights(tensors: dict, key_index: int, change: str, keep_metadata: bool, metadata_source: bytes):
    """The bytes of ``tensors`` saved with one change (and the original metadata when
    ``keep_metadata``), and the tensors that file holds."""
    from safetensors import safe_open

    tensors = {k: v.clone() for k, v in tensors.items()}
    key = sorted(tensors)[key_index % len(tensors)]
    if change == "shape":
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    elif change == "rename":
        tensors[key.replace("layers.", "layer.")] = tensors.pop(key)
    elif change == "drop":
        del tensors[key]
    elif change == "extra":
        tensors[key.rsplit(".", 1)[0] + ".lora_C"] = torch.zeros(2)
    elif change == "values":
        tensors[key] = tensors[key] + 1
    metadata = None
    if keep_metadata:
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(metadata_source)
            f.flush()
            with safe_open(f.name, framework="pt") as opened:
                metadata = opened.metadata()
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        save_file(tensors, f.name, metadata=metadata)
        return open(f.name, "rb").read(), tensors


CORRUPTIONS = {
    "truncate": st.tuples(st.just("truncate"), st.sampled_from([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]),
                          st.floats(0, 1, exclude_max=True)),
    "flip": st.tuples(st.just("flip"), st.sampled_from([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]),
                      st.integers(0, 10**6), st.integers(0, 7)),
    "config_text": st.tuples(st.just("config_text"), st.text(max_size=40)),
    "config_value": st.tuples(
        st.just("config_value"),
        st.sampled_from(["r", "num_experts", "k_high", "alpha", "target_modules", "entropy_source", "base_model", "tau_low"]),
        st.one_of(st.none(), st.integers(-2, 9), st.floats(allow_nan=True), st.text(max_size=5),
                  st.lists(st.integers(0, 2), max_size=2), st.booleans())),
    # Re-saved weights: another shape, key, or values, with the saved metadata or none
    # (a file from elsewhere, which holds a different but valid adapter when only values change).
    "weights": st.tuples(st.just("weights"), st.integers(0, 50), st.sampled_from(["shape", "rename", "drop", "extra", "values"]),
                         st.booleans()),
}


def corrupt(files: dict, tensors: dict, corruption):
    """The damaged files, and the tensors a load that succeeds must give."""
    files = dict(files)
    kind = corruption[0]
    if kind == "truncate":
        _, name, fraction = corruption
        files[name] = files[name][: int(len(files[name]) * fraction)]
    elif kind == "flip":
        _, name, position, bit = corruption
        files[name] = flip(files[name], position, bit)
    elif kind == "config_text":
        files[ADAPTER_CONFIG_NAME] = corruption[1].encode()
    elif kind == "config_value":
        files[ADAPTER_CONFIG_NAME] = edited_config(files[ADAPTER_CONFIG_NAME], corruption[1], corruption[2])
    else:
        _, index, change, keep_metadata = corruption
        files[ADAPTER_WEIGHTS_NAME], tensors = resaved_weights(tensors, index, change, keep_metadata,
                                                               files[ADAPTER_WEIGHTS_NAME])
    return files, tensors


def adapter_state(model):
    if not is_patched(model):
        return None
    return model.alter_config, {f"{n}.{s}": layer.get_parameter(s).detach().clone()
                                for n, layer in alter_layers(model).items()
                                for s in ("lora_A", "lora_B", "router.weight", "router.entropy_weight")}


def same_state(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_corrupted_adapter_is_refused_or_loads_exactly(kind, data):
    base, files, tensors, config = saved_adapter()
    corruption = data.draw(CORRUPTIONS[kind])
    damaged, held = corrupt(files, tensors, corruption)
    expected = (config, held)
    unpatched = copy.deepcopy(base)
    patched = apply_alter(copy.deepcopy(base), alter_config(r=2, num_experts=3, target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory() as folder:
        for name, data in damaged.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        for model in (unpatched, patched):
            before = adapter_state(model)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the patched model adopting k_high=2
                    load_adapter(model, folder)
            except (ValueError, FileNotFoundError) as exc:
                assert str(exc).startswith("load_adapter: ") or ADAPTER_CONFIG_NAME in str(exc), repr(exc)
                assert same_state(adapter_state(model), before), "a refused load changed the model"
            else:
                # Loaded: exactly the adapter as saved (a flip in padding or unused metadata).
                assert same_state(adapter_state(model), expected), f"silent wrong load after {corruption}"
