"""A trained network's report, in one place: sampling, features, reference, metrics, floors and the class judge.

``pipelines/evaluate.py`` and the search's workers (``tune/worker.py``) both call ``Evaluator`` so that every trial
and every re-evaluation is judged the same way:

* ``settings``: the head/tail split every evaluation scores, the feature network, the samplers, the autocast;
* ``samples``: generated samples at the scored shape, drawn by one worker or shared out between a trial's workers;
* ``real_sets``: the real images' features (reference, the judge's calibration images and the judge, the floor
  pool, the training images), cached on disk;
* ``evaluator``: ``Evaluator``: the proxy scores a search ranks by, the full scores of a guidance grid with their
  noise floors, the memorisation check;
* ``selection``: the guidance value a network is reported at, and its headline metrics.
"""

from .evaluator import Evaluator, GuidanceResult
from .real_sets import RealSets
from .samples import Samples, SampleSource, gather_to_rank0, resize_samples
from .selection import HEADLINE_KEYS, best_by_fid, headline
from .settings import (evaluation_split, feature_extractor, final_sampling, judge_network, sampler_settings,
                       sampling_autocast)

__all__ = ["Evaluator", "GuidanceResult", "RealSets", "Samples", "SampleSource", "gather_to_rank0", "resize_samples",
           "HEADLINE_KEYS", "best_by_fid", "headline", "evaluation_split", "feature_extractor", "final_sampling",
           "judge_network", "sampler_settings", "sampling_autocast"]
