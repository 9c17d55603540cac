"""Every MLflow tag name the project writes or reads: the one place a tag's wire name is spelled.

The naming rule: the tag ``pdcbdm.x_y`` is the constant ``X_Y_TAG`` (``pdcbdm.data.num_images`` is
``DATA_NUM_IMAGES_TAG``), except for the few names that predate this module and kept their short forms
(``TRIAL_TAG``, ``REUSED_TAG``, ``CHECKPOINTS_TAG``, ``CHECKPOINT_TAG``, ``VERSIONS_TAG``, ``EXPERIMENT_KIND_TAG``).
MLflow's own tags (``mlflow.*``) that the project sets or reads live here too. Optuna user attributes are not MLflow
tags: they stay beside the code that writes them (tune/verdicts.py, tune/warm_start.py).
"""
from __future__ import annotations

from typing import Mapping

# --- a search's and a trial's identity -------------------------------------------------------------------------
TRIAL_TAG = "pdcbdm.trial_id"
SEARCH_TAG = "pdcbdm.search"  # the readable name; two searches may share it
SEARCH_ID_TAG = "pdcbdm.search_id"  # unique per search (search.json): every lookup of a search's runs uses it
KIND_TAG = "pdcbdm.kind"
CELL_TAG = "pdcbdm.cell"  # a grid cell's name (``variant-sSEED``, ``rank1-s1000``): the run of that cell
# a hash of a trial's resolved config (seed and evaluation settings included): two runs with the same key trained
# and scored the same thing, so a grid (tune/grid.py) reuses a FINISHED, completed run instead of training again
CONFIG_KEY_TAG = "pdcbdm.config_key"
CODE_VERSION_TAG = "pdcbdm.code_version"  # pdcbdm.version.code_version() of the code that trained the run

# --- how a run ended ---------------------------------------------------------------------------------------------
# how a trial's run ended, in words: "completed", "early-stopped by ASHA at step N", "failed: REASON", "killed"
# (MLflow's status says FINISHED for the first two)
OUTCOME_TAG = "pdcbdm.outcome"
ERROR_TAG = "pdcbdm.error"  # a failed run's error text (its traceback's end)

# --- how a run trained and was scored: runs scored differently are never ranked together --------------------------
EXTRACTOR_TAG = "pdcbdm.extractor"  # the feature network's identity (its weights' sha256)
REFERENCE_KIND_TAG = "pdcbdm.reference_kind"  # the reference images' kind (pdcbdm.evaluation.Evaluator.scoring)
JUDGE_TAG = "pdcbdm.judge"  # the classifier that judges generated images' labels, in words
# an evaluator's scoring facts (pdcbdm.evaluation.Evaluator.scoring's keys) to the tags that record them
SCORING_TAGS = {"reference_kind": REFERENCE_KIND_TAG, "judge": JUDGE_TAG}
PRECISION_TAG = "pdcbdm.precision"
DEVICE_TAG = "pdcbdm.device"
EVAL_PROTOCOL_TAG = "pdcbdm.eval_protocol"
NODES_TAG = "pdcbdm.nodes"  # + ".stepN": the Ray node id of each rank (rank order) of the attempt that began at N

# --- the data a run trained on -----------------------------------------------------------------------------------
DATA_NUM_IMAGES_TAG = "pdcbdm.data.num_images"
DATA_NUM_CLASSES_TAG = "pdcbdm.data.num_classes"
DATA_RHO_TAG = "pdcbdm.data.rho"
DATA_DIGEST_TAG = "pdcbdm.data.digest"
DATA_IMAGE_SHAPE_TAG = "pdcbdm.data.image_shape"

# --- Ray's checkpoints of a trial ----------------------------------------------------------------------------------
CHECKPOINTS_TAG = "pdcbdm.ray_checkpoints"  # the trial's Train run folder in Ray's storage (its checkpoint_* folders)
CHECKPOINT_TAG = "pdcbdm.ray_checkpoint"  # its last training checkpoint, set when the trial ends

# --- a search's or a grid's parent run -----------------------------------------------------------------------------
BEST_COMMAND_TAG = "pdcbdm.best_command"
BEST_TRIAL_TAG = "pdcbdm.best_trial"
BEST_MODEL_TAG = "pdcbdm.best_model"  # the registry URI of the search's winner, where it was registered
TIME_BUDGET_TAG = "pdcbdm.time_budget"  # what the search's time budget did, in words
REUSED_TAG = "pdcbdm.reused_runs"  # on a grid's parent run: the cells' runs it took from earlier invocations
LEAD_TEST_TAG = "pdcbdm.lead_test"  # on a confirmation's parent run: the test that decides its verdict
VERDICT_TAG = "pdcbdm.verdict"  # ... and that verdict

# --- the model registry --------------------------------------------------------------------------------------------
CHOSEN_BY_TAG = "pdcbdm.chosen_by"  # on a model version: what chose it, in words
CONFIRM_TAG_PREFIX = "pdcbdm.confirm."  # + a confirmation result's key: that result, on the version it confirmed

# --- MLflow's own tags -----------------------------------------------------------------------------------------------
# what the experiment holds, as MLflow's UI records a user's choice of "Model training" over "GenAI"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions, which MLflow's UI links to
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # a child run's parent: MLflow's UI nests the run under it
NOTE_CONTENT_TAG = "mlflow.note.content"  # a run's description in MLflow's UI
DATA_CONTEXT_TAG = "mlflow.data.context"  # a logged dataset input's role ("training")


def confirm_tag(key: str) -> str:
    """The tag that records the confirmation result ``key`` on a model version."""
    return f"{CONFIRM_TAG_PREFIX}{key}"


def nodes_tag(step: int) -> str:
    """The tag that records the Ray nodes of the attempt that began at ``step``."""
    return f"{NODES_TAG}.step{step}"


def scoring_tags(scoring: Mapping[str, str]) -> dict[str, str]:
    """An evaluator's scoring facts (pdcbdm.evaluation.Evaluator.scoring) as the run tags that record them."""
    return {SCORING_TAGS[key]: value for key, value in scoring.items()}
