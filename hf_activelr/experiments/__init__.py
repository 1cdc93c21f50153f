"""The measurements behind README: sweeps (:mod:`.sweep`, its tasks :mod:`.sweep_tasks`), the
quality protocol (:mod:`.protocol`), side-by-side runs of a recipe (:mod:`.compare`), the
offline defaults (:mod:`.offline`) and the plots and tables (:mod:`.reporting`). Imports the
layers below it (``optim``, ``integrations``); nothing imports it back."""
