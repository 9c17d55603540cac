"""Generated images written back as a class folder: ``DIR/<class folder>/<n>.png`` plus ``DIR/manifest.csv``.

The layout is the one an image classifier reads (torchvision's ``ImageFolder``: a folder per class, the files in
it): the augmentation a long-tail user asks for. ``pipelines.generate`` is the command; this module holds the rules.

Seeds. Image ``n`` of class ``k`` is row ``n mod B`` of batch ``b = n // B`` of that class (``B`` the batch size).
Every random draw of a batch (the initial x_T and, for DDPM or DDIM with eta > 0, each step's noise) is made for all
``B`` rows from a generator seeded with ``batch_seed(seed, k, b)`` and sliced (``pdcbdm.sampling.Rows``), so image
``n`` is the same whichever rows of its batch a run generates: a resumed run, or a top-up to a larger count, gives
the same images for the same indices (same model, sampler settings, seed, batch size and kind of device: the
noise is drawn on the device, so that a step uploads nothing; up to the floating-point differences of the network
run at another batch size).

Resuming. A file that exists is kept and never regenerated; only the missing indices are sampled. The manifest
(one row per generated file) is rewritten atomically before each batch's files are written, so every file the
command wrote has its row; a row whose file is missing (a run stopped between the two) is dropped and the image
made again. PNGs are written atomically, so no half-written image is ever left under its final name.

Nothing here imports ray, mlflow or optuna.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.io import atomic_write_bytes
from pdcbdm.progress import tqdm
from pdcbdm.sampling import Rows, ddim_sample, ddpm_sample, to_uint8
from pdcbdm.viz import save_labelled_rows

__all__ = ["MANIFEST", "MANIFEST_COLUMNS", "Settings", "Job", "Outcome", "folder_names", "batch_seed", "image_path",
           "plan_jobs", "sample_job", "png_bytes", "read_manifest", "write_manifest", "generate_folder",
           "write_preview", "top_up_targets"]

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "class", "label", "index", "guidance", "seed", "noise_seed", "batch_size", "batch_row",
                    "sampler", "steps", "eta", "model", "model_step")
# the columns that say how an image was made: a kept row that differs in one of them came from another run
SETTING_COLUMNS = ("guidance", "seed", "batch_size", "sampler", "steps", "eta", "model", "model_step")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')  # separators, controls and what Windows refuses in a name
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_NAME_BYTES = 120  # under every common file system's 255, with room for a suffix


@dataclass(frozen=True)
class Settings:
    """How the images are made: sampler, its steps and eta, guidance w, seed and batch size, and the model (its
    path or URI and training step, recorded in the manifest)."""

    sampler: str
    steps: int
    eta: float
    guidance: float
    seed: int
    batch_size: int
    model: str
    model_step: int
    clip_x0: bool = True

    def row_values(self) -> dict[str, str]:
        """The manifest cells of these settings, as the CSV holds them (strings), for comparing with kept rows."""
        return {"guidance": f"{self.guidance:g}", "seed": str(self.seed), "batch_size": str(self.batch_size),
                "sampler": self.sampler, "steps": str(self.steps), "eta": f"{self.eta:g}", "model": self.model,
                "model_step": str(self.model_step)}


@dataclass(frozen=True)
class Job:
    """One sampling call: rows [start, stop) of batch ``batch`` of class ``label``; ``write`` the indices (global,
    within the class) whose files are missing. The span covers the first to the last missing index of the batch,
    so the rows in between that exist are sampled again but not written."""

    label: int
    batch: int
    start: int
    stop: int
    write: tuple[int, ...]


def _safe_name(name: str) -> str:
    """A class name as one folder name: separators, control characters and ``:*?"<>|`` become ``_``, leading dots
    and spaces (hidden folders, ``..``) and trailing ones (Windows drops them) too; Windows' device names get a
    ``_`` in front; at most _MAX_NAME_BYTES of UTF-8; never empty."""
    text = _UNSAFE.sub("_", unicodedata.normalize("NFC", name))
    stripped = text.strip(". ")
    lead, trail = len(text) - len(text.lstrip(". ")), len(text) - len(text.rstrip(". "))
    text = "_" * min(lead, 1) + stripped + "_" * min(trail, 1) if stripped else "_"
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = "_" + text
    while len(text.encode()) > _MAX_NAME_BYTES:
        text = text[:-1]
    return text


def folder_names(class_names: Sequence[str]) -> list[str]:
    """One safe folder name per class (``_safe_name``), unique also on case-insensitive file systems.

    Computed over all of the model's classes (never a selection of them), so a class keeps its folder whatever
    ``--classes`` picks. Names that coincide after sanitizing (``a/b`` and ``a_b``, ``Cat`` and ``cat``) all get
    ``~<label>``; the manifest keeps the real names."""
    bases = [_safe_name(str(n)) for n in class_names]
    clashes = Counter(b.casefold() for b in bases)
    out: list[str] = []
    used: set[str] = set()
    for k, base in enumerate(bases):
        name = base if clashes[base.casefold()] == 1 else f"{base}~{k}"
        while name.casefold() in used:
            name += "~"
        used.add(name.casefold())
        out.append(name)
    return out


def batch_seed(seed: int, label: int, batch: int) -> int:
    """The seed of batch ``batch`` of class ``label`` (a 63-bit integer from numpy's SeedSequence, stable across
    versions and platforms): neighbouring seeds, classes and batches get unrelated noise."""
    state = np.random.SeedSequence([int(seed), int(label), int(batch)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def image_path(out: Path, folder: str, index: int) -> Path:
    """Where image ``index`` of a class lives: ``out/<folder>/<index>.png``."""
    return out / folder / f"{index}.png"


def top_up_targets(real: Sequence[int], up_to: int, labels: Iterable[int]) -> dict[int, int]:
    """Images to generate per class so that real plus generated reaches ``up_to``: ``max(0, up_to - real[k])``."""
    return {k: max(0, up_to - int(real[k])) for k in labels}


def _class_jobs(out: Path, folder: str, label: int, count: int, batch_size: int) -> list[Job]:
    """The jobs of one class: per batch of ``batch_size`` indices below ``count``, its missing files."""
    jobs = []
    for b in range(0, (count + batch_size - 1) // batch_size):
        first, last = b * batch_size, min(count, (b + 1) * batch_size)
        missing = tuple(n for n in range(first, last) if not image_path(out, folder, n).exists())
        if missing:
            jobs.append(Job(label, b, missing[0] - first, missing[-1] + 1 - first, missing))
    return jobs


def plan_jobs(out: Path, folders: Sequence[str], targets: Mapping[int, int], batch_size: int) -> list[Job]:
    """Every job needed so that class k holds images 0 .. targets[k] - 1 (files that exist are kept)."""
    return [job for k in sorted(targets) for job in _class_jobs(out, folders[k], k, targets[k], batch_size)]


@torch.no_grad()
def sample_job(net: nn.Module, diffusion: GaussianDiffusion, job: Job, shape: tuple[int, int, int],
               settings: Settings, *, null_label: int, device: torch.device,
               autocast: Callable[[], Any] = nullcontext) -> torch.Tensor:
    """The images of a job's rows, uint8 [stop - start, C, H, W] on the CPU (the noise rule: module docstring)."""
    generator = torch.Generator(device).manual_seed(batch_seed(settings.seed, job.label, job.batch))
    labels = torch.full((job.stop - job.start,), job.label, dtype=torch.long, device=device)
    kw = dict(guidance=settings.guidance, null_label=null_label, generator=generator, autocast=autocast,
              clip_x0=settings.clip_x0, rows=Rows(job.start, job.stop, settings.batch_size))
    if settings.sampler == "ddim":
        x = ddim_sample(net, diffusion, labels, shape, steps=settings.steps, eta=settings.eta, **kw)
    elif settings.sampler == "ddpm":
        x = ddpm_sample(net, diffusion, labels, shape, **kw)
    else:
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {settings.sampler!r}")
    return to_uint8(x).cpu()


def png_bytes(image: torch.Tensor) -> bytes:
    """One uint8 image [C, H, W] as PNG: C = 1 as greyscale ("L"), C = 3 as "RGB", at its own size."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image [1 or 3, H, W], got {image.dtype} {tuple(image.shape)}")
    arr = image.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of an existing manifest (none when absent); ValueError naming the file when it is not ours."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "class"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: not a manifest of generated images (columns {reader.fieldnames}); move it "
                             f"away or choose another --out")
        return [dict(row) for row in reader]


def write_manifest(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the manifest atomically: MANIFEST_COLUMNS (a kept row's other columns are dropped)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _row(job: Job, n: int, folder: str, name: str, settings: Settings) -> dict[str, Any]:
    """The manifest row of image n of a job's class."""
    return {"file": f"{folder}/{n}.png", "class": name, "label": job.label, "index": n,
            "noise_seed": batch_seed(settings.seed, job.label, job.batch), "batch_row": n % settings.batch_size,
            **settings.row_values()}


def _kept_rows(out: Path) -> dict[str, dict[str, str]]:
    """The existing manifest's rows whose files exist, by file (a later row for a file replaces an earlier)."""
    return {row["file"]: row for row in read_manifest(out / MANIFEST) if (out / row["file"]).is_file()}


@dataclass
class Outcome:
    """What a run did per class: images kept (they existed), images generated; files without a manifest row and
    kept rows made with other settings (each worth a warning)."""

    kept: dict[int, int]
    generated: dict[int, int]
    unrecorded: list[str]
    other_settings: list[str]


def _survey(out: Path, folders: Sequence[str], targets: Mapping[int, int], rows: Mapping[str, Mapping[str, str]],
            settings: Settings) -> Outcome:
    """Count the wanted images that exist, and find those without a row or made with other settings."""
    outcome = Outcome({}, {k: 0 for k in targets}, [], [])
    mine = settings.row_values()
    for k, count in targets.items():
        present = [f"{folders[k]}/{n}.png" for n in range(count) if image_path(out, folders[k], n).is_file()]
        outcome.kept[k] = len(present)
        outcome.unrecorded += [f for f in present if f not in rows]
        outcome.other_settings += [f for f in present if f in rows
                                   and any(rows[f].get(c) != mine[c] for c in SETTING_COLUMNS)]
    return outcome


def generate_folder(net: nn.Module, diffusion: GaussianDiffusion, out: str | Path, *, class_names: Sequence[str],
                    targets: Mapping[int, int], shape: tuple[int, int, int], settings: Settings,
                    device: torch.device, autocast: Callable[[], Any] = nullcontext,
                    progress: bool = True) -> Outcome:
    """Make class k hold images 0 .. targets[k] - 1 under ``out/<folder of k>/``, generating the missing ones.

    Args:
        net: the noise-prediction network (eval mode, on ``device``); label ``len(class_names)`` is its null label.
        diffusion: the model's diffusion process.
        out: the output folder (created).
        class_names: all of the model's classes, in label order (folders come from all of them).
        targets: label -> number of images the class should hold.
        shape: the network's image shape (C, H, W): images are written at this size.
        settings: sampler, guidance, seed, batch size and the model's name for the manifest.
        device: where the network runs.
        autocast: context for the network's forward passes (bf16 autocast or none).
        progress: a progress bar over the images to generate, on stderr.

    Returns:
        The Outcome (kept and generated per class, files without a row, rows of other settings).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = folder_names(class_names)
    rows = _kept_rows(out)
    outcome = _survey(out, folders, targets, rows, settings)
    jobs = plan_jobs(out, folders, targets, settings.batch_size)
    bar = tqdm(total=sum(len(j.write) for j in jobs), desc="generating", unit="img", disable=not progress)
    for job in jobs:
        images = sample_job(net, diffusion, job, shape, settings, null_label=len(class_names), device=device,
                            autocast=autocast)
        first = job.batch * settings.batch_size + job.start
        for n in job.write:
            rows[f"{folders[job.label]}/{n}.png"] = _row(job, n, folders[job.label], class_names[job.label], settings)
        write_manifest(out / MANIFEST, rows.values())  # rows first: every written file has its row
        for n in job.write:
            atomic_write_bytes(image_path(out, folders[job.label], n), png_bytes(images[n - first]))
        outcome.generated[job.label] += len(job.write)
        bar.update(len(job.write))
    bar.close()
    if not jobs:
        write_manifest(out / MANIFEST, rows.values())  # drops the rows of deleted files
    return outcome


PREVIEW = "preview.png"


def write_preview(out: str | Path, class_names: Sequence[str], targets: Mapping[int, int], *,
                  per_class: int = 8) -> Path:
    """``out/preview.png``: the first ``per_class`` images of each generated class, a row per class with its name
    (a picture to look at before the folder goes to a classifier)."""
    out, folders = Path(out), folder_names(class_names)
    rows = []
    for k in sorted(targets):
        files = [image_path(out, folders[k], n) for n in range(min(per_class, targets[k]))]
        images = [torch.from_numpy(_as_chw(np.asarray(Image.open(f)))) for f in files if f.is_file()]
        rows.append((class_names[k], images))
    return save_labelled_rows(rows, out / PREVIEW, title=f"generated images, first {per_class} per class")


def _as_chw(pixels: np.ndarray) -> np.ndarray:
    """A PNG's pixels (H, W) or (H, W, C) as uint8 (C, H, W)."""
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).astype(np.uint8)
