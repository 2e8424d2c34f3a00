"""The MLflow layout's names, defined once: what ``tracking`` / the Tune callback log and ``analysis/`` reads.

Torch-free (``analysis/`` imports it without PyTorch or Ray).
"""

from __future__ import annotations

# experiment tag: how MLflow tells a training experiment from a GenAI one (an experiment without it can open on the
# GenAI "Traces" view). MLflow 3.17.2's UI reads it only when its GenAI / Model training switch is built out; with
# the switch (default GenAI) the view comes from the URL, so `sophon-ray ui` links carry
# ?workflowType=machine_learning.
EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"

# run tags
ROLE, SWEEP, KEY, PARENT, NODE = "sophon.role", "sophon.sweep_id", "sophon.key", "mlflow.parentRunId", "sophon.node_id"

# attack-run params: who was attacked, on which grid and domain, with which recipe
SUBJECT, VARIANT, PROTECT_SEED, GRID, DOMAIN, DATA_POOL = (
    "subject", "variant", "protect_seed", "grid", "domain", "data_pool")
RECIPE = ("strategy", "optimizer", "lr", "batch_size", "data_fraction", "schedule", "epochs", "weight_decay", "seed")
ATTACK_PARAMS = (SUBJECT, VARIANT, PROTECT_SEED, GRID, DOMAIN, DATA_POOL, *RECIPE)
NO_VARIANT, NO_PROTECT_SEED = "-", -1   # normal and scratch runs

# attack-run metrics: per epoch (step = epoch, 0 = before fine-tuning) and at the end (step 0)
RESTRICTED_ACC, RESTRICTED_LOSS = "restricted_acc", "restricted_loss"
FINAL, BEST, ORIGINAL_ACC = "restricted_acc_final", "restricted_acc_best", "original_acc"

# the two attack grids: which data each fine-tunes on and scores on
DEVELOPMENT, EVALUATION = "development", "evaluation"
GRIDS = (DEVELOPMENT, EVALUATION)

# protect-run params and metrics
PROTECT_METRICS = ("original_val_acc", "original_test_acc", "intactness_drop", "probe_acc", "selected_iteration",
                   "rollbacks")
SPEC_ARTIFACT = "spec.yaml"      # the resolved spec, at the root of the parent run
REPORT_ARTIFACTS = "report"      # the report files, under this folder of the parent run
