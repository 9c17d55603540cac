"""The search space as a file (``--space FILE``, YAML or JSON; the default is ``tune/spaces/default.yaml``).

A file names each searched knob (a config field) with its range, scale and step, or its choices (the file's own
comments describe the format). ``resolve`` checks it against the search's base config and turns it into a plain
``{knob: entry}`` dict with every relative part made explicit (``range_around_preset`` as numbers, ``choices:
auto`` as the placements valid for the preset's U-Net). That dict is what search.json and the parent MLflow run
record, what ``--resume`` reads back, and what ``suggest`` (the define-by-run space, a module-level function that
Ray pickles with the searcher) and ``distributions`` (Optuna's view of it, for warm-start checks) are built from.

No Ray or MLflow here: a bad file fails in the driver before either is touched.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pdcbdm.config import Config, ConfigError, apply_overrides, check_ceilings, parse_resolution_list, shown
from pdcbdm.training import network_levels

DEFAULT_SPACE = Path(__file__).resolve().parent / "spaces" / "default.yaml"
SEARCHABLE_SECTIONS = ("model", "diffusion", "loss", "train")
# fields every trial of a search must share: the budget and evaluation schedule (ASHA and Optuna compare trials
# at the same steps), the network family (TSA choices are resolved against it), where and how a trial runs
SHARED_FIELDS = ("model.network", "train.steps", "train.eval_every", "train.log_every", "train.device",
                 "train.threads")
ENTRY_KEYS = ("range", "range_around_preset", "choices", "scale", "step")
# the file's one key that is not a knob: points evaluated right after the preset's (a baseline in every search)
START_KEY = "start_points"
RANGE_ENDS = ("low", "high")
TSA_KNOB = "model.tsa_resolutions"


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and the entry."""


@functools.lru_cache(maxsize=1)
def default_knobs() -> tuple[str, ...]:
    """The config fields the default space file (``DEFAULT_SPACE``) searches, in file order: the one list of the
    searched knobs for code that reads a search's records."""
    return tuple(knob for knob in read_file(DEFAULT_SPACE) if knob != START_KEY)


def tsa_choices(levels: Sequence[int]) -> tuple[str, ...]:
    """TSA placements for a U-Net with these feature-map resolutions (largest first): none, each single level
    below the input resolution, the paper's "16" analogue (the second level), and every level below the input
    (``choices: auto``)."""
    inner = [str(r) for r in levels[1:]]
    return tuple(dict.fromkeys(["", *inner, ",".join(inner)]))


def read_file(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping (JSON for ``.json``, YAML otherwise), refused when unreadable or not a
    non-empty mapping of knob names."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpaceError(f"space file {path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() != ".json":
        _refuse_aliases(text, path)
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        raise SpaceError(f"space file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"space file {path}: expected a mapping of knob names (such as loss.pd_weight) to "
                         f"their range or choices, got {type(data).__name__ if data else 'nothing'}")
    return data


def _refuse_aliases(text: str, path: Path) -> None:
    """A space file is a handful of knobs: YAML anchors and aliases serve no purpose in one, and nested aliases
    expand exponentially (a few hundred bytes become gigabytes when loaded or shown)."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise SpaceError(f"space file {path}, line {line}: YAML anchors and aliases (&name, *name) are not "
                                 f"accepted in a space file; write each entry out")
    except yaml.YAMLError:
        return  # the loader reports the syntax error


def resolve(data: Mapping[str, Any], cfg: Config, fixed: Sequence[str] = (), source: str = "",
            allow_large: bool = False) -> dict[str, dict]:
    """The searched knobs of a space file, in file order, checked against ``cfg`` (the search's base config) and
    made explicit; knobs in ``fixed`` (pinned with ``--set``) are left out. ``source`` names the file in errors.

    An entry resolves to ``{"type": "float"|"int", "low", "high", "log", "step"}`` or ``{"type":
    "categorical", "choices"}``. Every bound and choice must make a valid config within the ceilings of
    ``pdcbdm.config.CEILINGS`` (unless ``allow_large``)."""
    flat = cfg.flat()
    out: dict[str, dict] = {}
    for knob, entry in data.items():
        if knob == START_KEY:
            continue
        where = f"space file {source}, entry {shown(knob)}"
        check_knob(knob, flat, where)
        if knob in fixed:
            continue
        if not isinstance(entry, dict):
            raise SpaceError(f"{where}: expected a mapping with range, range_around_preset or choices, "
                             f"got {shown(entry)}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise SpaceError(f"{where}: unknown key(s) {unknown}; valid: {list(ENTRY_KEYS)}")
        kinds = [k for k in ("range", "range_around_preset", "choices") if k in entry]
        if len(kinds) != 1:
            raise SpaceError(f"{where}: give exactly one of range, range_around_preset or choices, got "
                             f"{kinds or 'none'}")
        resolved = (_choices(knob, entry, cfg, where) if kinds == ["choices"]
                    else _numeric(knob, entry, flat[knob], where))
        _check_values(knob, resolved, cfg, where, allow_large)
        out[knob] = resolved
    return out


def check_knob(knob: Any, flat: Mapping[str, Any], where: str) -> None:
    """A knob must be a config field of a searchable section and not one every trial shares."""
    if not isinstance(knob, str) or knob not in flat:
        raise SpaceError(f"{where}: not a config field (SECTION.FIELD as --set takes it, e.g. loss.pd_weight)")
    if knob.split(".", 1)[0] not in SEARCHABLE_SECTIONS or knob in SHARED_FIELDS:
        raise SpaceError(f"{where}: cannot be searched: every trial of a search shares the data, sampling and "
                         f"evaluation settings (w is scored over eval.guidance_grid, never searched) and "
                         f"{', '.join(SHARED_FIELDS)}; searchable: fields of {', '.join(SEARCHABLE_SECTIONS)}")


def _numeric(knob: str, entry: Mapping[str, Any], current: Any, where: str) -> dict:
    """A ``range`` or ``range_around_preset`` entry as explicit bounds, scale and step."""
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise SpaceError(f"{where}: the field holds {shown(current)}, not a number: give choices instead of a range")
    is_int = isinstance(current, int)
    if "range" in entry:
        bounds = entry["range"]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
            raise SpaceError(f"{where}: range must be [LOW, HIGH] (two finite numbers), got {shown(bounds)}")
        low, high = bounds
    else:
        low, high = _around_preset(entry["range_around_preset"], current, where)
    scale = entry.get("scale", "linear")
    if scale not in ("linear", "log"):
        raise SpaceError(f"{where}: scale must be linear or log, got {shown(scale)}")
    step = entry.get("step")
    if not low < high:
        raise SpaceError(f"{where}: empty or inverted range [{low}, {high}] (LOW must be below HIGH)")
    if scale == "log" and low <= 0:
        raise SpaceError(f"{where}: a log scale needs LOW > 0, got [{low}, {high}]")
    if step is not None:
        _check_step(step, low, high, scale, is_int, where)
    if is_int and not all(float(b).is_integer() for b in (low, high)):
        raise SpaceError(f"{where}: the field is an integer, so the range must hold integers, got [{low}, {high}]")
    kind = "int" if is_int else "float"
    cast = int if is_int else float
    return {"type": kind, "low": cast(low), "high": cast(high), "log": scale == "log",
            "step": None if step is None else cast(step)}


def _around_preset(factor: Any, current: float, where: str) -> tuple[float, float]:
    """[preset / F, preset x F]: a range that follows the preset (and --set of other fields) it is used with."""
    if not _is_number(factor) or factor <= 1:
        raise SpaceError(f"{where}: range_around_preset must be a number > 1 (the factor either side of the "
                         f"preset's value), got {shown(factor)}")
    if current <= 0:
        raise SpaceError(f"{where}: range_around_preset needs a positive preset value, the preset holds "
                         f"{shown(current)}; give range: [LOW, HIGH] instead")
    return current / factor, current * factor


def _check_step(step: Any, low: float, high: float, scale: str, is_int: bool, where: str) -> None:
    if not _is_number(step) or step <= 0:
        raise SpaceError(f"{where}: step must be a positive number, got {shown(step)}")
    if scale == "log":
        raise SpaceError(f"{where}: step cannot be combined with a log scale (Optuna has no stepped log scale)")
    if is_int and not float(step).is_integer():
        raise SpaceError(f"{where}: the field is an integer, so step must be one, got {shown(step)}")
    steps = (high - low) / step
    if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
        raise SpaceError(f"{where}: step {step} does not fit the range [{low}, {high}] ({steps:.4g} steps; "
                         f"HIGH - LOW must be a whole number of steps)")


def _choices(knob: str, entry: Mapping[str, Any], cfg: Config, where: str) -> dict:
    """A ``choices`` entry as an explicit list (``auto`` only for the TSA placements)."""
    if "scale" in entry or "step" in entry:
        raise SpaceError(f"{where}: scale and step apply to ranges, not to choices")
    choices = entry["choices"]
    if choices == "auto":
        if knob != TSA_KNOB:
            raise SpaceError(f"{where}: choices: auto exists only for {TSA_KNOB}")
        return {"type": "categorical", "choices": list(tsa_choices(network_levels(cfg)))}
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: choices must be a non-empty list{' or auto' if knob == TSA_KNOB else ''}, "
                         f"got {shown(choices)}")
    if isinstance(cfg.flat()[knob], str):  # YAML reads `8` as a number; the field (and Optuna's choice) is text
        choices = [str(c) if _is_number(c) else c for c in choices]
    bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
    if bad:
        raise SpaceError(f"{where}: choices must be strings, numbers or booleans, got {bad[0]!r}")
    if len(set(map(repr, choices))) != len(choices):
        raise SpaceError(f"{where}: choices repeat a value: {shown(choices)}")
    return {"type": "categorical", "choices": list(choices)}


def _check_values(knob: str, entry: Mapping[str, Any], cfg: Config, where: str, allow_large: bool = False) -> None:
    """Every choice and both bounds make a valid config (the config's own checks), and every TSA placement
    exists in the preset's U-Net."""
    values = entry["choices"] if entry["type"] == "categorical" else [entry["low"], entry["high"]]
    for value in values:
        try:
            check_ceilings(apply_overrides(cfg, {knob: value}), allow_large)
        except (ConfigError, TypeError, ValueError) as exc:
            raise SpaceError(f"{where}: {shown(value)} is not a valid value ({exc})") from None
        if knob == TSA_KNOB:
            _check_tsa(value, cfg, where)


def _check_tsa(value: Any, cfg: Config, where: str) -> None:
    levels = network_levels(cfg)
    bad = [r for r in parse_resolution_list(value, TSA_KNOB) if r not in levels]
    if bad:
        raise SpaceError(f"{where}: TSA choice {shown(value)} names resolution(s) {bad} that the {cfg.model.network!r} "
                         f"U-Net does not have (its levels: {list(levels)})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def suggest(trial: Any, spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Define-by-run space over a resolved spec (``resolve``): only suggests, in the spec's order. Module-level
    and over plain data, so that ``functools.partial(suggest, spec=...)`` pickles with Ray's searcher."""
    for knob, e in spec.items():
        if e["type"] == "categorical":
            trial.suggest_categorical(knob, list(e["choices"]))
        elif e["type"] == "int":
            trial.suggest_int(knob, e["low"], e["high"], step=e["step"] or 1, log=e["log"])
        else:
            trial.suggest_float(knob, e["low"], e["high"], step=e["step"], log=e["log"])
    return None


def distributions(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Optuna's distribution of each knob, the same as ``suggest`` asks for."""
    out: dict[str, Any] = {}
    for knob, e in spec.items():
        if e["type"] == "categorical":
            out[knob] = CategoricalDistribution(list(e["choices"]))
        elif e["type"] == "int":
            out[knob] = IntDistribution(e["low"], e["high"], step=e["step"] or 1, log=e["log"])
        else:
            out[knob] = FloatDistribution(e["low"], e["high"], step=e["step"], log=e["log"])
    return out


def contains(distribution: Any, value: Any) -> bool:
    """Whether ``value`` lies in an Optuna distribution (a choice of it, or inside its range and on its step)."""
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def preset_point(spec: Mapping[str, Mapping[str, Any]], flat: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The first trial's point: the base config's value of each searched knob, and the knobs left out of it
    because their value lies outside the space (Optuna samples those)."""
    dists = distributions(spec)
    point = {k: flat[k] for k in spec if contains(dists[k], flat[k])}
    return point, [k for k in spec if k not in point]


def load(path: str | Path, cfg: Config, fixed: Sequence[str] = (), allow_large: bool = False) -> dict[str, dict]:
    """``read_file`` then ``resolve``: the searched knobs of the file at ``path`` against ``cfg``."""
    return load_with_starts(path, cfg, fixed, allow_large)[0]


def load_with_starts(path: str | Path, cfg: Config, fixed: Sequence[str] = (),
                     allow_large: bool = False) -> tuple[dict[str, dict], list[dict]]:
    """The searched knobs of the file at ``path`` against ``cfg`` (``resolve``) and its ``start_points``."""
    data = read_file(path)
    spec = resolve(data, cfg, fixed, str(path), allow_large)
    return spec, start_points(data, spec, str(path))


def start_points(data: Mapping[str, Any], spec: Mapping[str, Mapping[str, Any]], source: str = "") -> list[dict]:
    """The file's ``start_points``: a list of mappings from searched knobs to values, each the change from the
    preset's point of a trial that runs right after it (the default file's: the CBDM baseline). A numeric knob
    also takes ``low`` or ``high``, its range's ends (a lambda range resolved around the preset has no fixed
    number that fits every preset). A knob pinned with --set (in the file, not in ``spec``) is left out: the pin
    holds for every trial. A knob the file does not search and values outside the space are refused, naming the
    point and the knob."""
    raw = data.get(START_KEY, [])
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise SpaceError(f"space file {source}: {START_KEY} must be a list of mappings from knobs to values, "
                         f"got {shown(raw)}")
    dists = distributions(spec)
    points = []
    for i, raw_point in enumerate(raw):
        where = f"space file {source}, {START_KEY}[{i}]"
        point = {}
        for knob, value in raw_point.items():
            if knob not in spec:
                if knob not in data or knob == START_KEY:  # a typo would otherwise leave the point unchanged
                    raise SpaceError(f"{where}: {shown(knob)} is not a config field the file searches "
                                     f"({', '.join(k for k in data if k != START_KEY)})")
                continue  # pinned with --set: the pin holds for every trial
            if value in RANGE_ENDS and spec[knob]["type"] != "categorical":
                value = spec[knob][value]
            if not contains(dists[knob], value):
                raise SpaceError(f"{where}: {knob} = {shown(value)} lies outside the searched "
                                 f"{_describe(spec[knob])}")
            point[knob] = value
        points.append(point)
    return points


def _describe(entry: Mapping[str, Any]) -> str:
    if entry["type"] == "categorical":
        return f"choices {list(entry['choices'])}"
    return f"range [{entry['low']}, {entry['high']}]"


def first_points(spec: Mapping[str, Mapping[str, Any]], flat: Mapping[str, Any],
                 starts: Sequence[Mapping[str, Any]] = ()) -> tuple[list[dict], list[str]]:
    """The points a search evaluates before TPE proposes: the preset's (``preset_point``), then each start point
    as a change of it (a repeat of an earlier point is dropped); and the knobs left out of the preset's point."""
    point, outside = preset_point(spec, flat)
    points = [point] if point else []
    for start in starts:
        candidate = {**point, **start}
        if candidate and candidate not in points:
            points.append(candidate)
    return points, outside
