"""The EMA network of a trial as an MLflow model: ``mlflow.pytorch.log_model`` in the "pt2" format, and the loader
that ``pipelines.evaluate --checkpoint runs:/RUN_ID/model`` samples from.

Why "pt2" (``torch.export``) and never "pickle": a pickled model runs code on load. The graph is traced at one
example batch, with the batch dimension declared dynamic (``-1`` in the signature): whoever serves the archive calls
the network at several batch sizes. Image size, channels and dtypes are fixed, as they are for the network anyway.
What sampling and scoring need besides the network (config, class counts and names, image shape, step) is stored
in the model's MLmodel file under ``metadata["pdcbdm"]``.

The loader treats a run's model as untrusted input: a run folder on shared storage can hold anything. It never
calls ``mlflow.pytorch.load_model`` (which puts the model's ``code/`` folder on ``sys.path`` and imports the module
``data/pickle_module_info.txt`` names before any pickle check), nor ``torch.export.load`` (which hands strings of the
archive's graph JSON to ``sympy.sympify``, an ``eval``, and ``exec``s its guards when unlifting). It copies the
files, refuses (ModelLoadError naming the file and the reason) anything that is not what ``log_ema_model`` writes,
and reads only two things: the MLmodel file, with ``yaml.safe_load``, and the weights, as raw little-endian float32
records of the pt2 zip. The network itself is rebuilt from the config in the metadata, as ``load_model`` rebuilds a
checkpoint's, so the graph in the archive is never deserialized and nothing of the run is imported or unpickled.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickletools
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

from pdcbdm.config import Config
from pdcbdm.training.checkpoint import CheckpointError, load_state_strict
from pdcbdm.training.trainer import build_network

MODEL_NAME = "model"
METADATA_KEY = "pdcbdm"
_META_FIELDS = ("config", "num_classes", "class_counts", "image_shape", "class_names", "step")
EXAMPLE_BATCH = 2  # > 1: torch.export keeps a size-1 dimension static


class ModelLoadError(ValueError):
    """A model URI that cannot be loaded as a pdcbdm network; the message names the URI and the cause."""


def _signature(image_shape: tuple[int, int, int]) -> Any:
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape), "x"),
                     TensorSpec(np.dtype(np.int64), (-1,), "t"), TensorSpec(np.dtype(np.int64), (-1,), "y")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]))


def _example(image_shape: tuple[int, int, int], num_classes: int) -> tuple[torch.Tensor, ...]:
    """x_t, t and y of EXAMPLE_BATCH samples (one labelled, one with the null label: both embedding rows)."""
    return (torch.zeros(EXAMPLE_BATCH, *image_shape), torch.zeros(EXAMPLE_BATCH, dtype=torch.long),
            torch.tensor([0, num_classes] * (EXAMPLE_BATCH // 2), dtype=torch.long))


def model_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a sampling payload (``Trainer.sampling_payload``) that evaluation needs."""
    meta = {k: payload[k] for k in _META_FIELDS}
    meta["image_shape"] = [int(s) for s in meta["image_shape"]]
    return meta


def log_ema_model(uri: str, run_id: str, net: nn.Module, payload: dict[str, Any]) -> str:
    """Log ``net`` (the EMA network, in eval mode, on the CPU, in the contiguous layout) as the run's model
    ``MODEL_NAME``; returns its model URI. ``payload`` is the trainer's sampling payload (its config, classes, image
    shape and step go into the MLmodel metadata; its tensors do not: the graph holds them). The graph names no
    device (tests/test_model_safety.py checks it): whoever loads it moves the module where it samples, CPU or CUDA."""
    meta = model_metadata(payload)
    shape = tuple(meta["image_shape"])
    # a copy: exporting must not move or retrace the network training goes on with (a DDP or compiled wrapper);
    # contiguous: a channels_last network (train.gpu_options) would be archived with NHWC strides, which the
    # loader's raw records refuse
    cpu_net = copy.deepcopy(net).to("cpu").to(memory_format=torch.contiguous_format).eval()
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    mlflow.set_tracking_uri(uri)
    # the logged model belongs to the active experiment, and runs:/ID/model finds it only in the run's own
    mlflow.set_experiment(experiment_id=experiment_id)
    with torch.no_grad():
        info = mlflow.pytorch.log_model(
            cpu_net, name=MODEL_NAME, run_id=run_id, serialization_format="pt2", signature=_signature(shape),
            input_example=_example(shape, int(meta["num_classes"])), metadata={METADATA_KEY: meta},
            pip_requirements=[],  # nothing to infer (inference would load the model once more): pdcbdm's env
            step=int(meta["step"]))
    return info.model_uri


def is_model_uri(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names an MLflow model (runs:/..., models:/...) rather than a checkpoint file."""
    return str(spec).startswith(("runs:/", "models:/"))


# ---------------------------------------------------------------- the loader: what a pdcbdm model may hold

# Top-level entries of the folder log_ema_model writes (MLflow's environment files are copied, never read);
# anything else, a code/ folder first of all, is refused.
_MODEL_ENTRIES = frozenset({"MLmodel", "data", "conda.yaml", "python_env.yaml", "requirements.txt", "constraints.txt",
                            "registered_model_meta", "input_example.json", "serving_input_example.json"})
_PT2_FILE = "model.pt2"
_PYTORCH_FLAVOR_KEYS = frozenset({"code", "model_data", "pytorch_version", "serialization_format"})
# Short text records of torch.export's archive: ASCII and at most one newline, so they cannot hold a pickle.
_TEXT_RECORDS = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"})
_TEXT_CONTENT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_FLOAT32 = 7  # torch._export.serde.schema.ScalarType.FLOAT: the dtype code of a float32 record
_STRIDED = 7  # torch._export.serde.schema.Layout.Strided
# The globals torch.save's pickle of the example inputs (float32 and int64 tensors) references; any other global,
# and the opcodes that reach a callable without GLOBAL, are refused. pickletools only parses, it never runs a pickle.
_TENSOR_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "collections OrderedDict", "torch FloatStorage",
                             "torch LongStorage"})
_CALLABLE_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_SAMPLE_RECORD = re.compile(r"[^/]+/(data\.pkl|data/\d+|\.format_version|\.storage_alignment|byteorder|version"
                            r"|\.data/serialization_id|\.data/version)")


def _refused(uri: str, file: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{uri}: {file}: {reason} (refused: a pdcbdm model is the pt2 EMA network that "
                          f"log_ema_model writes and nothing else; nothing of it was imported or unpickled)")


def _read_mlmodel(folder: Path, uri: str) -> dict[str, Any]:
    """The ``metadata["pdcbdm"]`` of the folder's MLmodel, read with ``yaml.safe_load``. The rule: exactly one
    flavor, pytorch (see ``_check_pytorch_flavor``), and the metadata sampling needs."""
    path = folder / "MLmodel"
    if not path.is_file() or path.is_symlink():
        raise _refused(uri, "MLmodel", "missing: not an MLflow model")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _refused(uri, "MLmodel", f"not readable YAML ({exc})") from None
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"pytorch"} or not isinstance(flavors["pytorch"], dict):
        found = sorted(flavors) if isinstance(flavors, dict) else flavors
        raise _refused(uri, "MLmodel", f"flavors {found}: a pdcbdm model has the pytorch flavor only")
    _check_pytorch_flavor(flavors["pytorch"], uri)
    meta = doc.get("metadata")
    meta = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(meta, dict):
        raise _refused(uri, "MLmodel", f"no metadata['{METADATA_KEY}']: an MLflow model but not a pdcbdm network")
    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise _refused(uri, "MLmodel", f"metadata['{METADATA_KEY}'] lacks {missing}")
    return meta


def _check_pytorch_flavor(flavor: dict[str, Any], uri: str) -> None:
    """The rule: no code folder (``code`` absent or null), no key but MLflow's pt2 ones (so no
    ``pickle_module_name``), ``serialization_format`` pt2 if given, ``model_data: data``."""
    if flavor.get("code") is not None:
        raise _refused(uri, "MLmodel", f"the pytorch flavor names a code folder ({flavor['code']!r}), which MLflow "
                                       f"puts on sys.path; a pdcbdm model carries no code")
    unknown = sorted(set(flavor) - _PYTORCH_FLAVOR_KEYS)
    if unknown:
        raise _refused(uri, "MLmodel", f"the pytorch flavor has {unknown}, keys of no pt2 model "
                                       f"(pickle_module_name: MLflow's pickle format)")
    if flavor.get("serialization_format", "pt2") != "pt2":
        raise _refused(uri, "MLmodel", f"serialization_format {flavor['serialization_format']!r}: only pt2 "
                                       f"(torch.export) is loaded, never pickle")
    if flavor.get("model_data") != "data":
        raise _refused(uri, "MLmodel", f"model_data {flavor.get('model_data')!r}: expected 'data'")


def _check_files(folder: Path, uri: str) -> Path:
    """The folder's pt2 archive. The rule: no symbolic link, no top-level entry but MLmodel, MLflow's environment
    files and ``data/``, and ``data/`` holds ``model.pt2`` and nothing else (no model.pth, no
    pickle_module_info.txt)."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise _refused(uri, str(path.relative_to(folder)), "a symbolic link")
    for path in sorted(folder.iterdir()):
        if path.name not in _MODEL_ENTRIES:
            what = "a code folder, which MLflow puts on sys.path" if path.name == "code" else "an unknown entry"
            raise _refused(uri, path.name, f"{what}; a pdcbdm model holds MLmodel, MLflow's environment files "
                                           f"and data/{_PT2_FILE} only")
    data = folder / "data"
    others = sorted(p.name for p in data.iterdir() if p.name != _PT2_FILE) if data.is_dir() else []
    if others:
        raise _refused(uri, f"data/{others[0]}", f"the data folder holds {_PT2_FILE} only (a model.pth or a "
                                                  f"pickle_module_info.txt is MLflow's pickle format)")
    if not (data / _PT2_FILE).is_file():
        raise _refused(uri, f"data/{_PT2_FILE}", "missing")
    return data / _PT2_FILE


class _Pt2Archive:
    """A torch.export archive read record by record, by name relative to its one top folder. Duplicate names are
    refused: Python's zipfile and torch's reader need not pick the same one."""

    def __init__(self, archive: zipfile.ZipFile, uri: str, file: str) -> None:
        self.archive, self.uri, self.file = archive, uri, file
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if not names or len(set(names)) != len(names):
            raise self.refused("", "an empty archive or one with duplicate record names")
        top = names[0].split("/", 1)[0]
        stray = [n for n in names if not n.startswith(f"{top}/")]
        if stray:
            raise self.refused(stray[0], f"outside the archive's top folder {top}/")
        self.records = {n[len(top) + 1:]: n for n in names}

    def refused(self, rel: str, reason: str) -> ModelLoadError:
        return _refused(self.uri, f"{self.file}:{rel}" if rel else self.file, reason)

    def read(self, rel: str) -> bytes:
        if rel not in self.records:
            raise self.refused(rel, "missing")
        return self.archive.read(self.records[rel])

    def json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.refused(rel, f"not JSON ({exc})") from None


def _read_pt2_weights(path: Path, uri: str) -> dict[str, torch.Tensor]:
    """The parameters of a torch.export archive, read as raw float32 records, never through ``torch.export.load``.

    The rule, record by record: the short text records (``archive_format`` "pt2", ``byteorder`` "little",
    versions); one graph ``models/NAME.json`` (never read: the network is rebuilt from its config); the weights and
    constants configs (JSON; every entry ``use_pickle: false`` and a ``weight_N`` / ``tensor_N`` record); those raw
    records, whatever their bytes (read with ``frombuffer``, never unpickled); the example inputs
    ``data/sample_inputs/NAME.pt`` (never read either), a torch.save whose pickle references only the globals that
    rebuild a tensor. Any other record (a ``*.pkl``, a pickled weight or constant, a custom or opaque object,
    AOTInductor code, extra files) is refused.
    """
    file = f"data/{_PT2_FILE}"
    if sys.byteorder != "little":
        raise _refused(uri, file, "its little-endian records need a little-endian machine")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refused(uri, file, f"not a zip archive ({exc})") from None
    with archive:
        pt2 = _Pt2Archive(archive, uri, file)
        name = _model_name(pt2)
        weights = _payload_entries(pt2, "weights", name, "weight_")
        constants = _payload_entries(pt2, "constants", name, "tensor_")
        raw = ({f"data/weights/{e['path_name']}" for e in weights.values()}
               | {f"data/constants/{e['path_name']}" for e in constants.values()})
        missing = sorted(raw - set(pt2.records))
        if missing:
            raise pt2.refused(missing[0], "missing")
        for rel in pt2.records:
            _check_record(pt2, rel, name, raw)
        return {fqn: _raw_tensor(pt2, f"data/weights/{e['path_name']}", e.get("tensor_meta"))
                for fqn, e in weights.items()}


def _model_name(pt2: _Pt2Archive) -> str:
    """NAME of the archive's one graph ``models/NAME.json``."""
    graphs = [rel for rel in pt2.records if rel.startswith("models/")]
    match = re.fullmatch(r"models/(\w+)\.json", graphs[0]) if len(graphs) == 1 else None
    if match is None:
        raise pt2.refused("models/", f"graphs {graphs}: a pdcbdm archive holds one models/NAME.json")
    return match.group(1)


def _payload_entries(pt2: _Pt2Archive, kind: str, name: str, prefix: str) -> dict[str, dict[str, Any]]:
    """FQN -> entry of the weights or constants config; each entry must be a raw ``prefix``N record
    (``use_pickle: false``: torch.export.load would unpickle the others with ``weights_only=False``)."""
    rel = f"data/{kind}/{name}_{kind}_config.json"
    doc = pt2.json(rel)
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise pt2.refused(rel, "not a payload config")
    for fqn, entry in entries.items():
        if (not isinstance(entry, dict) or entry.get("use_pickle") is not False
                or not re.fullmatch(rf"{prefix}\d+", str(entry.get("path_name")))):
            raise pt2.refused(rel, f"the entry {fqn!r} is not a raw {prefix}N record (a pickled payload)")
    return entries


def _check_record(pt2: _Pt2Archive, rel: str, name: str, raw: set[str]) -> None:
    """One record against the rule of ``_read_pt2_weights``."""
    if rel in raw or rel in (f"models/{name}.json", f"data/weights/{name}_weights_config.json",
                             f"data/constants/{name}_constants_config.json"):
        return
    if rel in _TEXT_RECORDS:
        content = pt2.read(rel)
        expected = {"archive_format": b"pt2", "byteorder": b"little"}.get(rel)
        if not _TEXT_CONTENT.fullmatch(content) or (expected is not None and content.strip() != expected):
            raise pt2.refused(rel, f"{content[:40]!r} is not what torch.export writes there")
        return
    if rel == f"data/sample_inputs/{name}.pt":
        _check_sample_inputs(pt2, rel)
        return
    raise pt2.refused(rel, "not a record of a pickle-free pt2 archive (a pickle, a pickled or custom object, "
                           "compiled code or an extra file)")


def _check_sample_inputs(pt2: _Pt2Archive, rel: str) -> None:
    """The example inputs: a torch.save zip of tensors whose one pickle ``data.pkl`` references only
    ``_TENSOR_GLOBALS`` (torch.export.load falls back to ``weights_only=False`` for them)."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(pt2.read(rel)))
    except zipfile.BadZipFile:
        raise pt2.refused(rel, "not a torch.save archive") from None
    with inner:
        names = [n for n in inner.namelist() if not n.endswith("/")]
        odd = [n for n in names if not _SAMPLE_RECORD.fullmatch(n)]
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if odd or len(pickles) != 1 or len(set(names)) != len(names):
            raise pt2.refused(rel, f"not a torch.save archive of tensors (records {odd[:3] or names[:3]})")
        foreign = _foreign_globals(inner.read(pickles[0]))
    if foreign:
        raise pt2.refused(f"{rel}:{pickles[0]}", f"a pickle that references {foreign[0]}; only tensors may be "
                                                  f"pickled there")


def _foreign_globals(stream: bytes) -> list[str]:
    """What a pickle stream reaches beyond ``_TENSOR_GLOBALS`` (globals by name, callable-reaching opcodes), found
    by parsing its opcodes; a stream that does not parse counts as foreign."""
    found = []
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name == "GLOBAL" and arg not in _TENSOR_GLOBALS:
                found.append(str(arg).replace(" ", "."))
            elif opcode.name in _CALLABLE_OPCODES:
                found.append(f"the opcode {opcode.name}")
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and others on a malformed stream
        found.append(f"a malformed stream ({type(exc).__name__})")
    return found


def _raw_tensor(pt2: _Pt2Archive, rel: str, meta: Any) -> torch.Tensor:
    """A float32 tensor from its raw record: contiguous, offset 0, exactly numel * 4 bytes (anything else refused)."""
    try:
        sizes = [int(d["as_int"]) for d in meta["sizes"]]
        strides = [int(d["as_int"]) for d in meta["strides"]]
        plain = (meta["dtype"] == _FLOAT32 and meta["layout"] == _STRIDED
                 and int(meta["storage_offset"]["as_int"]) == 0 and len(strides) == len(sizes))
    except (KeyError, TypeError, ValueError):
        raise pt2.refused(rel, "its tensor_meta has no plain sizes and strides") from None
    # a dimension of size 1 may carry any stride in a contiguous tensor
    plain = plain and all(s >= 0 for s in sizes) and all(
        st == math.prod(sizes[i + 1:]) for i, (n, st) in enumerate(zip(sizes, strides)) if n > 1)
    if not plain:
        raise pt2.refused(rel, "not a contiguous float32 tensor record")
    data = pt2.read(rel)
    numel = math.prod(sizes)
    if len(data) != 4 * numel:
        raise pt2.refused(rel, f"{len(data)} bytes for {numel} float32 values")
    if numel == 0:
        return torch.zeros(sizes)
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(sizes)


def _rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor], uri: str) -> tuple[nn.Module, Config]:
    """The network the metadata's config describes, in eval mode and frozen, with the archive's weights (strict)."""
    try:
        cfg = Config.from_dict(meta["config"])
        net = build_network(cfg, int(meta["num_classes"]), tuple(int(s) for s in meta["image_shape"]))
        load_state_strict(net, state, "EMA weights", uri)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{uri}: its metadata holds no valid config ({exc})") from None
    return net.eval().requires_grad_(False), cfg


def load_logged_model(model_uri: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Config, dict[str, Any]]:
    """(network, config, metadata) of a model logged by ``log_ema_model``: the same triple as
    ``pdcbdm.training.load_model`` gives for a checkpoint file, so that evaluation treats both alike.

    The tracking store is MLflow's current one (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``). The
    model's files are copied to a temporary folder and checked there (``_read_mlmodel``, ``_check_files``,
    ``_read_pt2_weights``); the network is rebuilt from the config and given the archive's raw weights. Raises
    ModelLoadError naming the URI (and the file and the reason) when the model is missing, not a pdcbdm model, or
    holds anything but the pt2 EMA network: code, a pickle, another format.
    """
    with tempfile.TemporaryDirectory(prefix="pdcbdm-model-") as tmp:
        try:  # copies files only: nothing of the model is read here
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing model
            raise ModelLoadError(f"cannot load the MLflow model {model_uri} ({type(exc).__name__}: {exc})") from None
        meta = _read_mlmodel(local, model_uri)
        state = _read_pt2_weights(_check_files(local, model_uri), model_uri)
    net, cfg = _rebuild(meta, state, model_uri)
    return net.to(device), cfg, {**meta, "weights": "ema", "source": model_uri}


def model_uri_of_run(run_id: str) -> str:
    """The URI ``pipelines.evaluate --checkpoint`` takes for a trial's model."""
    return f"runs:/{run_id}/{MODEL_NAME}"

