"""The search space: a module-level define-by-run function (Optuna pickles it with the searcher) that only
suggests values; the names are config fields, so a suggestion is applied with ``apply_overrides`` as is."""

from __future__ import annotations

from typing import Any, Sequence

SEARCHED = (
    "loss.pd_weight", "loss.cbdm_tau", "loss.cbdm_gamma", "loss.label_dist", "loss.split_ratio",
    "model.tsa_resolutions",
)
LABEL_DISTS = ("cbdm", "inverted", "uniform", "power:0.5")


def tsa_choices(levels: Sequence[int]) -> tuple[str, ...]:
    """TSA placements for a U-Net with these feature-map resolutions (largest first): none, each single level
    below the input resolution, the paper's "16" analogue (the second level), and every level below the input."""
    inner = [r for r in levels[1:]]
    singles = [str(r) for r in inner]
    return tuple(dict.fromkeys(["", *singles, ",".join(str(r) for r in inner)]))


def pd_weight_range(center: float) -> tuple[float, float]:
    """lambda's log-scale range: a decade either side of the preset's value (``loss.pd_weight``)."""
    return center / 10.0, center * 10.0


def search_space(trial: Any, fixed: Sequence[str] = (), tsa: Sequence[str] = ("", "8", "4", "8,4"),
                 pd_weight_center: float = 0.1) -> None:
    """Define-by-run space over the PD-CBDM training knobs (Eq. 9-14).

    ``fixed`` names fields the user pinned with ``--set`` (not searched); ``tsa`` lists the placements valid for
    the preset's U-Net. PD weight lambda is searched on a log scale a decade either side of the preset's
    ``pd_weight_center`` (0.1 for the ``cifar*`` presets: 0.01 to 1, the PD term's gradient share of L_DM's from
    under 1% to about its size, pipelines/pd_gradients.py; 0.025 for ``digits``, where 0.1 distorts the tail within
    the CPU budget); the head/tail ratio on the paper's 0.1 grid (6:4, 7:3, 8:2 and neighbours). The guidance
    scale w is not searched: it needs no retraining, so every trial is scored at the same fixed w
    (``eval.proxy_guidance``) and over ``eval.guidance_grid``.
    """
    if "loss.pd_weight" not in fixed:
        trial.suggest_float("loss.pd_weight", *pd_weight_range(pd_weight_center), log=True)
    if "loss.cbdm_tau" not in fixed:
        trial.suggest_float("loss.cbdm_tau", 0.1, 2.0)
    if "loss.cbdm_gamma" not in fixed:
        trial.suggest_float("loss.cbdm_gamma", 0.05, 1.0)
    if "loss.label_dist" not in fixed:
        trial.suggest_categorical("loss.label_dist", list(LABEL_DISTS))
    if "loss.split_ratio" not in fixed:
        trial.suggest_float("loss.split_ratio", 0.5, 0.9, step=0.1)
    if "model.tsa_resolutions" not in fixed:
        trial.suggest_categorical("model.tsa_resolutions", list(tsa))
    return None


def config_point(flat: dict[str, Any], fixed: Sequence[str] = ()) -> dict[str, Any]:
    """A search point (for ``points_to_evaluate``) from a flat config: the searched fields' current values."""
    return {k: flat[k] for k in SEARCHED if k not in fixed}
