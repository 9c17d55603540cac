"""Loading a model or a data file never runs code from it: the MLflow model loader, the exported graph's devices,
the checkpoint reader and the CIFAR unpickler, each against a planted file whose payload would write a marker."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from pdcbdm.data.cifar import load_cifar
from pdcbdm.presets import preset
from pdcbdm.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pdcbdm.training.trainer import build_network
from tests.fake_cifar import write_fake_cifar10
from tune.mlflow_model import ModelLoadError, load_logged_model, log_ema_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)
NUM_CLASSES = 10


class Payload:
    """Pickles as a call of ``exec`` on code that writes ``marker``: what a planted pickle does on load."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return exec, (self.code,)


def smoke_payload() -> dict:
    """The sampling payload log_ema_model takes, for the smoke preset's network."""
    return {"config": preset("smoke").to_dict(), "num_classes": NUM_CLASSES, "class_counts": [5] * NUM_CLASSES,
            "image_shape": list(SHAPE), "class_names": [f"c{k}" for k in range(NUM_CLASSES)], "step": 7}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The smoke preset's network logged by log_ema_model into a sqlite store, and a downloaded copy of its folder
    (the template of every planted model)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("models")
    cfg = preset("smoke")
    torch.manual_seed(0)
    net = build_network(cfg, NUM_CLASSES, SHAPE).eval()
    payload = smoke_payload()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("safety", artifact_location=(tmp / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    before = mlflow.get_tracking_uri()
    log_ema_model(uri, run_id, net, payload)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model",
                                                      dst_path=str(tmp / "template")))
    yield SimpleNamespace(uri=uri, client=client, exp=exp, run_id=run_id, net=net, folder=folder, tmp=tmp)
    mlflow.set_tracking_uri(before)


@pytest.fixture(autouse=True)
def _tracking_uri():
    """Each test sets MLflow's tracking URI as it needs; it is restored after."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def plant(logged, tmp_path: Path, edit: Callable[[Path], None]) -> str:
    """Copy the logged model's folder, ``edit`` the copy, and log it as the artifacts ``model`` of a new run (no
    logged model of its own, so runs:/ID/model names these files); returns that URI, the tracking URI set."""
    import mlflow

    folder = tmp_path / "planted"
    shutil.copytree(logged.folder, folder)
    edit(folder)
    run_id = logged.client.create_run(logged.exp).info.run_id
    logged.client.log_artifacts(run_id, str(folder), "model")
    mlflow.set_tracking_uri(logged.uri)
    return f"runs:/{run_id}/model"


def edit_mlmodel(folder: Path, change: Callable[[dict], None]) -> None:
    doc = yaml.safe_load((folder / "MLmodel").read_text())
    change(doc)
    (folder / "MLmodel").write_text(yaml.safe_dump(doc))


def edit_archive(folder: Path, change: Callable[[dict[str, bytes]], None]) -> None:
    """Rewrite data/model.pt2 with ``change`` applied to its records (name -> bytes, names with the top folder)."""
    path = folder / "data" / "model.pt2"
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    change(records)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)


def plant_code(folder: Path, marker: Path) -> None:
    """MLflow's pickle-format layout with a code folder: mlflow.pytorch.load_model puts code/ on sys.path and
    imports the module data/pickle_module_info.txt names, evil, whose import writes ``marker``."""
    (folder / "code").mkdir()
    (folder / "code" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "data" / "pickle_module_info.txt").write_text("evil")
    (folder / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
    edit_mlmodel(folder, lambda doc: doc["flavors"]["pytorch"].update(code="code"))


# ---------------------------------------------------------------- the legitimate model


def test_the_logged_model_loads_as_the_network_it_was(logged, tmp_path):
    """The loader rebuilds the network from the metadata's config and gives it the archive's raw weights: the very
    outputs of the logged network; so does a copy logged as plain run artifacts (how the planted models below are
    logged: runs:/ID/model resolves to them)."""
    import mlflow

    mlflow.set_tracking_uri(logged.uri)
    x, t = torch.randn(3, *SHAPE), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 4, NUM_CLASSES])
    for uri in (f"runs:/{logged.run_id}/model", plant(logged, tmp_path, lambda folder: None)):
        net, cfg, meta = load_logged_model(uri)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert meta["step"] == 7 and meta["weights"] == "ema" and meta["source"] == uri
        assert cfg.model.ch == preset("smoke").model.ch
        with torch.no_grad():
            assert torch.equal(net(x, t, y), logged.net(x, t, y))


def test_the_archive_holds_what_the_loader_admits(logged):
    """The real pt2 archive: text records, one graph, the payload configs (every entry raw, use_pickle false),
    raw weight records and the example inputs; the loader's dtype and layout codes are torch's."""
    from torch._export.serde.schema import Layout, ScalarType

    from tune import mlflow_model

    assert (mlflow_model._FLOAT32, mlflow_model._STRIDED) == (ScalarType.FLOAT.value, Layout.Strided.value)
    assert sorted(p.name for p in (logged.folder / "data").iterdir()) == ["model.pt2"]
    flavors = yaml.safe_load((logged.folder / "MLmodel").read_text())["flavors"]
    assert list(flavors) == ["pytorch"] and flavors["pytorch"]["code"] is None
    with zipfile.ZipFile(logged.folder / "data" / "model.pt2") as archive:
        names = {n.split("/", 1)[1] for n in archive.namelist()}
        config = json.loads(archive.read("model/data/weights/model_weights_config.json"))["config"]
    assert {"archive_format", "byteorder", "models/model.json", "data/sample_inputs/model.pt"} <= names
    assert not [n for n in names if n.endswith(".pkl")]
    assert config and all(entry["use_pickle"] is False for entry in config.values())


# ---------------------------------------------------------------- planted models


def test_a_planted_model_is_a_live_attack_on_mlflows_own_loader(logged, tmp_path):
    """The control: mlflow.pytorch.load_model runs the planted code (with pickle deserialisation disallowed) before
    it refuses anything, so the refusals below are refusals of a working payload. In a child process: the import
    pollutes sys.path and sys.modules."""
    marker = tmp_path / "marker"
    uri = plant(logged, tmp_path, lambda folder: plant_code(folder, marker))
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1])\n"
            "try:\n    mlflow.pytorch.load_model(sys.argv[2])\nexcept Exception as exc:\n    print(exc)\n")
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", code, logged.uri, uri], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert marker.read_text() == "ran", proc.stdout + proc.stderr


def test_the_planted_model_is_refused_and_its_code_never_runs(logged, tmp_path, capsys):
    marker = tmp_path / "marker"
    uri = plant(logged, tmp_path, lambda folder: plant_code(folder, marker))
    with pytest.raises(ModelLoadError) as err:
        load_logged_model(uri)
    message = str(err.value)
    print(message)  # shown with -s: the loader's error as evaluate prints it
    assert message.startswith(f"{uri}: MLmodel: the pytorch flavor names a code folder ('code')")
    assert not marker.exists() and "evil" not in sys.modules
    assert not any("planted" in p or "pdcbdm-model-" in p for p in sys.path)


def _drop_code_key(folder: Path) -> None:
    edit_mlmodel(folder, lambda doc: doc["flavors"]["pytorch"].pop("code"))


def _opaque_object(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(records: dict[str, bytes]) -> None:
        records["model/data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    return change


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(records: dict[str, bytes]) -> None:
        name = "model/data/weights/model_weights_config.json"
        config = json.loads(records[name])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        records[name] = json.dumps(config).encode()
        records[f"model/data/weights/{first['path_name']}"] = pickle.dumps(Payload(marker))
    return change


def _pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(records: dict[str, bytes]) -> None:
        name = "model/data/sample_inputs/model.pt"
        with zipfile.ZipFile(io.BytesIO(records[name])) as inner:
            parts = {n: inner.read(n) for n in inner.namelist()}
        parts[next(n for n in parts if n.endswith("/data.pkl"))] = pickle.dumps(Payload(marker), protocol=2)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as inner:
            for n, data in parts.items():
                inner.writestr(n, data)
        records[name] = buffer.getvalue()
    return change


def _pkl_record(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(records: dict[str, bytes]) -> None:
        records["model/data.pkl"] = pickle.dumps(Payload(marker))
    return change


VARIANTS = {
    # id: (edit of the folder given the marker, what the error names)
    "code folder": (lambda folder, marker: (plant_code(folder, marker), _drop_code_key(folder)),
                    "code: a code folder"),
    "model.pth": (lambda folder, marker: (folder / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker))),
                  "data/model.pth: the data folder holds model.pt2 only"),
    "pickle_module_info": (lambda folder, marker: (folder / "data" / "pickle_module_info.txt").write_text("evil"),
                           "data/pickle_module_info.txt: the data folder holds model.pt2 only"),
    "pickle format": (lambda folder, marker: edit_mlmodel(
        folder, lambda doc: doc["flavors"]["pytorch"].update(serialization_format="pickle")),
        "MLmodel: serialization_format 'pickle': only pt2"),
    "pickle module": (lambda folder, marker: edit_mlmodel(
        folder, lambda doc: doc["flavors"]["pytorch"].update(pickle_module_name="evil")),
        "MLmodel: the pytorch flavor has ['pickle_module_name']"),
    "pyfunc flavor": (lambda folder, marker: edit_mlmodel(
        folder, lambda doc: doc["flavors"].update(python_function={"loader_module": "evil", "code": "code"})),
        "MLmodel: flavors ['python_function', 'pytorch']"),
    "opaque object": (lambda folder, marker: edit_archive(folder, _opaque_object(marker)),
                      "data/model.pt2:data/constants/opaque_obj_0: not a record of a pickle-free pt2 archive"),
    "pickled weight": (lambda folder, marker: edit_archive(folder, _pickled_weight(marker)),
                       "data/model.pt2:data/weights/model_weights_config.json: the entry"),
    "pickled sample inputs": (lambda folder, marker: edit_archive(folder, _pickled_sample_inputs(marker)),
                              "a pickle that references __builtin__.exec"),  # protocol 2: Python 2's name
    "pkl record": (lambda folder, marker: edit_archive(folder, _pkl_record(marker)),
                   "data/model.pt2:data.pkl: not a record of a pickle-free pt2 archive"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_model_that_is_not_the_pt2_network_is_refused_naming_file_and_reason(variant, logged, tmp_path):
    marker = tmp_path / "marker"
    edit, expected = VARIANTS[variant]
    uri = plant(logged, tmp_path, lambda folder: edit(folder, marker))
    with pytest.raises(ModelLoadError, match="refused") as err:
        load_logged_model(uri)
    assert str(err.value).startswith(f"{uri}: ") and expected in str(err.value), str(err.value)
    assert not marker.exists()


def test_a_graph_that_would_run_code_in_torch_export_load_is_never_read(logged, tmp_path):
    """torch.export.load hands the graph's symbolic sizes to sympy.sympify (an eval): this one writes the marker
    there. The loader never deserializes the graph, so it loads the weights and the payload stays inert."""
    marker = tmp_path / "marker"

    def change(records: dict[str, bytes]) -> None:
        graph = json.loads(records["model/models/model.json"])
        values = graph["graph_module"]["graph"]["sym_int_values"]
        expr = next(iter(values.values()))["as_expr"]
        expr["expr_str"] = f"{expr['expr_str']} + 0*len(str(exec({Payload(marker).code!r})))"
        records["model/models/model.json"] = json.dumps(graph).encode()

    uri = plant(logged, tmp_path, lambda folder: edit_archive(folder, change))
    net, _, _ = load_logged_model(uri)
    assert not marker.exists()
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([1, 2]), torch.tensor([0, NUM_CLASSES])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), logged.net(x, t, y))
    try:  # the control: torch.export.load runs the payload (whether or not it then fails)
        torch.export.load(tmp_path / "planted" / "data" / "model.pt2")
    except Exception:  # noqa: BLE001 - only the marker matters here
        pass
    assert marker.read_text() == "ran"


def test_evaluate_exits_2_on_the_planted_model_and_runs_none_of_it(logged, tmp_path):
    marker = tmp_path / "marker"
    uri = plant(logged, tmp_path, lambda folder: plant_code(folder, marker))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.evaluate", "--checkpoint", uri, "--tracking-uri", logged.uri,
           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: {uri}: MLmodel: the pytorch flavor names a code folder ('code')" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out" / "metrics.json").exists()


# ---------------------------------------------------------------- the exported graph's devices


def _devices(value) -> list[torch.device]:
    if isinstance(value, torch.device):
        return [value]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _devices(v)]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _devices(v)]
    return []


def pinned_devices(exported: torch.export.ExportedProgram) -> list[str]:
    """What ties an exported graph to the device it was traced on: a node that names a device (``arange(...,
    device=cpu)``, the ``_assert_tensor_metadata`` that ``.to(dtype)`` records), a tensor constant lifted from the
    trace (``torch.tensor(...)`` in forward: a plain attribute of the loaded module, which ``Module.to`` leaves on
    the CPU), any constant that is not a non-persistent buffer (buffers follow ``Module.to``), and a device literal
    in the loaded module's code."""
    found = [n.format_node() for n in exported.graph.nodes if _devices((n.args, n.kwargs))]
    found += [f"lifted tensor constant {name}" for name in exported.graph_signature.lifted_tensor_constants]
    buffers = set(exported.graph_signature.non_persistent_buffers)
    found += [f"constant {name}, not a buffer" for name in exported.constants if name not in buffers]
    found += [f"code: {line.strip()}" for line in exported.module().code.splitlines() if "device" in line]
    return found


class _TracedOnTheCpu(torch.nn.Module):
    """The time embedding as it was before its frequencies became a buffer, and a literal tensor."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(4, device=t.device, dtype=torch.float32)
        return t.to(torch.float32)[:, None] * freqs * torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_the_device_check_finds_what_pins_a_graph_to_the_cpu():
    """pinned_devices is not vacuous: the pre-buffer time embedding's trace has arange(..., device=cpu) and a
    cpu assertion on t, and a literal tensor becomes a lifted constant."""
    found = pinned_devices(torch.export.export(_TracedOnTheCpu(), (torch.zeros(2, dtype=torch.long),)))
    assert any("aten.arange" in f and "device: cpu" in f for f in found), found
    assert any("_assert_tensor_metadata" in f and "device: cpu" in f for f in found), found
    assert any(f.startswith("lifted tensor constant") for f in found), found


def test_the_exported_graph_pins_no_device(logged):
    """No node of the logged graph carries a literal device (the time embedding's frequencies are a buffer, its
    dtype cast a type_as) and its one constant is that non-persistent buffer: the graph runs wherever its module
    is moved, here on the meta device (what a CUDA run needs, checked in tests/test_gpu.py). The frequencies stay
    out of the state_dict, so checkpoints load as before. (Our own archive: torch.export.load is fine on it.)"""
    exported = torch.export.load(logged.folder / "data" / "model.pt2")
    assert not pinned_devices(exported), pinned_devices(exported)
    assert list(exported.constants) == ["time_embed.freqs"]
    module = exported.module().to("meta")
    x, t, y = (torch.zeros(3, *SHAPE, device="meta"), torch.zeros(3, dtype=torch.long, device="meta"),
               torch.zeros(3, dtype=torch.long, device="meta"))
    assert module(x, t, y).shape == (3, *SHAPE)
    assert not [k for k in logged.net.state_dict() if k.endswith("freqs")]


def test_the_logged_model_still_samples_on_the_cpu(logged):
    """The exported graph and the safe loader's rebuilt network sample the same images on the CPU."""
    import mlflow

    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.sampling import generate

    mlflow.set_tracking_uri(logged.uri)
    net, cfg, meta = load_logged_model(f"runs:/{logged.run_id}/model", device="cpu")
    graph = torch.export.load(logged.folder / "data" / "model.pt2").module()
    labels = torch.arange(meta["num_classes"]).repeat(2)
    kw = dict(steps=3, guidance=1.0, null_label=meta["num_classes"], batch_size=8)
    with torch.no_grad():
        images = generate(net, GaussianDiffusion(cfg.diffusion), labels, SHAPE, **kw)
        from_graph = generate(graph, GaussianDiffusion(cfg.diffusion), labels, SHAPE, **kw)
    assert images.shape == (20, *SHAPE) and images.dtype == torch.uint8
    assert (images.int() - from_graph.int()).abs().max() <= 1  # rounding of float differences to uint8


def test_a_channels_last_network_is_logged_in_the_layout_the_loader_reads(logged):
    """train.gpu_options=channels_last keeps the EMA network's weights NHWC; the archive's raw records must still
    be contiguous (the loader refuses strided ones), and the training network keeps its layout."""
    torch.manual_seed(1)
    net = build_network(preset("smoke"), NUM_CLASSES, SHAPE).eval().to(memory_format=torch.channels_last)
    run_id = logged.client.create_run(logged.exp).info.run_id
    log_ema_model(logged.uri, run_id, net, smoke_payload())  # sets the tracking URI
    assert any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters())
    loaded, _, _ = load_logged_model(f"runs:/{run_id}/model")
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([3, 700]), torch.tensor([1, NUM_CLASSES])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y), net(x, t, y), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_logged_model_loads_and_samples_on_cuda(logged):
    import mlflow

    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.sampling import generate

    mlflow.set_tracking_uri(logged.uri)
    net, cfg, meta = load_logged_model(f"runs:/{logged.run_id}/model", device="cuda")
    assert next(net.parameters()).device.type == "cuda"
    x, t = torch.randn(4, *SHAPE), torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, NUM_CLASSES])
    with torch.no_grad():
        expected = logged.net(x, t, y)
        assert torch.allclose(net(x.cuda(), t.cuda(), y.cuda()).cpu(), expected, atol=1e-4)
        graph = torch.export.load(logged.folder / "data" / "model.pt2").module().to("cuda")
        assert torch.allclose(graph(x.cuda(), t.cuda(), y.cuda()).cpu(), expected, atol=1e-4)
    labels = torch.arange(meta["num_classes"], device="cuda").repeat(2)
    images = generate(net, GaussianDiffusion(cfg.diffusion), labels, SHAPE, steps=3, guidance=1.0,
                      null_label=meta["num_classes"], batch_size=8)
    assert images.shape == (20, *SHAPE) and images.dtype == torch.uint8


# ---------------------------------------------------------------- checkpoints and CIFAR files


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    """Checkpoint files are read with torch.load(weights_only=True): a planted object is refused, not called."""
    marker = tmp_path / "marker"
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}, "evil": Payload(marker)})
    with pytest.raises(CheckpointError, match="corrupt or not a pdcbdm checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_crafted_cifar_file_is_refused_naming_the_global(tmp_path):
    folder = write_fake_cifar10(tmp_path / "cifar", 2, 1)
    images, labels, names = load_cifar("cifar10", tmp_path / "cifar", "train")  # the real layout still loads
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20,) and names[0] == "airplane"
    marker = tmp_path / "marker"
    batch = folder / "data_batch_2"
    entry = pickle.loads(batch.read_bytes())
    entry[b"filenames"] = Payload(marker)
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    # the global as the file names it: protocol 2 writes Python 2's __builtin__ for builtins
    with pytest.raises(ValueError, match=r"data_batch_2 is not a plain CIFAR pickle: it references the global "
                                         r"__builtin__\.exec"):
        load_cifar("cifar10", tmp_path / "cifar", "train")
    assert not marker.exists()
    with batch.open("rb") as f:  # the control: a plain pickle.load runs the payload
        pickle.load(f, encoding="bytes")
    assert marker.read_text() == "ran"


def test_the_cifar_unpickler_admits_what_cifar_files_hold(tmp_path):
    """numpy arrays (reconstructed under numpy 1's name as in the Python 2 originals, too), dtypes, lists, dicts,
    bytes (latin-1 only through _codecs.encode), str and int; another codec is refused."""
    from pdcbdm.data.cifar import _CifarUnpickler

    entry = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], b"name": "x", b"n": 2 ** 40}
    stream = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    got = _CifarUnpickler(io.BytesIO(stream), tmp_path / "f").load()
    assert np.array_equal(got[b"data"], entry[b"data"]) and got[b"labels"] == [1, 2] and got[b"n"] == 2 ** 40
    rot13 = pickle.dumps(b"x", protocol=2).replace(b"latin1", b"rot13 ")
    with pytest.raises(pickle.UnpicklingError, match="only latin1"):
        _CifarUnpickler(io.BytesIO(rot13), tmp_path / "f").load()
