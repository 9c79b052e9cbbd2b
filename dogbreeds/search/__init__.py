"""The study's searches on Ray Tune, and the best trial's way to a final model.

- `cnn3v2.py`: each trial a Ray Train run of the space file's model; the best configuration
  retrained on all the data and tested once.
- `head.py`: the frozen backbone's features computed once; every head trial trains on them,
  then the best head is joined to its backbone and tested end to end.
- `fine_tune.py`: a head search's best head with the top of its backbone unfrozen, each trial
  a Ray Train run; the best by validation tested once.

What they share, each module one job: `registry.py` (the kinds of search, `SEARCHES`, and the
space files checked for them), `tuning.py` (the search directory, Ray Tune and its Optuna study,
results.csv, best.json), `train_trials.py` (a trial that is a Ray Train run) and `final.py`
(the final model of a search, tested once). A search module registers itself when imported;
importing this package imports all three, so `SEARCHES` is complete wherever it is read.
Nothing here imports TensorFlow or Ray until a search runs.
"""

from dogbreeds.search.registry import SEARCHES, SearchKind, check_space, register_search, split_values, transfer_models
from dogbreeds.search.cnn3v2 import search_cnn3v2
from dogbreeds.search.head import search_head
from dogbreeds.search.fine_tune import search_fine_tune

__all__ = ["SEARCHES", "SearchKind", "check_space", "register_search", "search_cnn3v2", "search_fine_tune",
           "search_head", "split_values", "transfer_models"]
