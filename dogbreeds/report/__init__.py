"""The report: every run directory renders to one self-contained `report.html`.

    write_report("runs/cnn3v2")  # -> runs/cnn3v2/report.html, as `dogbreeds report runs/cnn3v2`

The report shows what the directory holds and leaves out what it does not:
- a training run (`dogbreeds train`, and a search's `final/`): the headline test metrics,
  learning curves, accuracy per breed, the most confused breed pairs with example photos of
  both breeds, and the model's predictions on a few test photos;
- a search (`dogbreeds search`: `results.csv`, `best.json`, `trials/<id>/history.json`,
  `final/`): every trial's learning curve, validation accuracy against each hyperparameter,
  the trials table, the chosen hyperparameters, then `final/` as a training run;
- a pipeline: its searches (sub-folders that are searches) and the exported model
  (`bundle/bundle.json`).

Plots are matplotlib figures drawn by Agg and saved as PNG, photos are small JPEG thumbnails,
and both are embedded as base64: the file needs no network and no other file.
"""

from dogbreeds.report.page import render_report, write_report
from dogbreeds.report.run import read_run

__all__ = ["read_run", "render_report", "write_report"]
