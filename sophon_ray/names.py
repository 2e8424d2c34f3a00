"""The MLflow layout's names, defined once: what ``tracking`` / the Tune callback log and ``analysis/`` reads.

Torch-free (``analysis/`` imports it without PyTorch or Ray).
"""

from __future__ import annotations

from dataclasses import dataclass

# experiment tag: how MLflow tells a training experiment from a GenAI one (an experiment without it can open on the
# GenAI "Traces" view). MLflow 3.17.2's UI reads it only when its GenAI / Model training switch is built out; with
# the switch (default GenAI) the view comes from the URL, so `sophon-ray ui` links carry
# ?workflowType=machine_learning.
EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"

# run tags
ROLE, SWEEP, KEY, PARENT, NODE = "sophon.role", "sophon.sweep_id", "sophon.key", "mlflow.parentRunId", "sophon.node_id"
MODE = "sophon.mode"   # on the parent run: classification | generation (no tag: a sweep from before generation mode)

# attack-run params: who was attacked, on which grid and domain, with which recipe
SUBJECT, VARIANT, PROTECT_SEED, GRID, DOMAIN, DATA_POOL = (
    "subject", "variant", "protect_seed", "grid", "domain", "data_pool")
# (the recipe's own params, one per setting, come from the recipe table: sophon_ray.recipes.param_casts)
TRIAL_PARAMS = (SUBJECT, VARIANT, PROTECT_SEED, GRID, DOMAIN, DATA_POOL)
# search trials also log which search (attack.search[i].name) and their place in it (0, 1, ...: the order the
# searcher proposed them); their parent is the search run of (subject, search, domain), tagged role=search
SEARCH, SEARCH_TRIAL = "search", "search_trial"
NO_VARIANT, NO_PROTECT_SEED = "-", -1   # normal and scratch runs


@dataclass(frozen=True)
class Metric:
    """The score a mode's runs log, and its MLflow keys. Both modes' scores are percentages where higher means the
    model does the task better (so on the restricted domain: the attack succeeded) and 0 is the do-nothing model:
    classification logs accuracy (chance = 100 / C), generation logs denoising skill, 100 x (1 - MSE) of the
    predicted noise at fixed timesteps (0 = predicting zero noise, the refusal DoS teaches; < 0 = worse than that),
    with the MSE itself as its loss (``restricted_mse``)."""

    short: str                  # acc | skill: the suffix of every score key below
    noun: str                   # what the score is, in words: accuracy | denoising skill
    loss: str = "loss"          # the suffix of the loss beside the score: cross-entropy (loss) | denoising MSE (mse)

    @property
    def axis(self) -> str:
        return f"{self.noun}, %"

    def key(self, part: str) -> str:
        return f"{part}_{self.short}"

    @property
    def restricted(self) -> str:
        return self.key("restricted")

    @property
    def restricted_loss(self) -> str:
        return f"restricted_{self.loss}"

    @property
    def final(self) -> str:
        return self.key("restricted") + "_final"

    @property
    def best(self) -> str:
        return self.key("restricted") + "_best"

    @property
    def original(self) -> str:
        return self.key("original")

    @property
    def val(self) -> str:
        return self.key("val")

    @property
    def val_best(self) -> str:
        return self.key("val") + "_best"

    @property
    def at_val_best(self) -> str:
        return self.key("restricted") + "_at_val_best"

    @property
    def found_val(self) -> str:
        return "best_found_" + self.key("val")

    @property
    def found_test(self) -> str:
        return "best_found_" + self.key("restricted")

    @property
    def protect_metrics(self) -> tuple[str, ...]:
        return (self.key("original_val"), self.key("original_test"), "intactness_drop", self.key("probe"),
                "selected_iteration", "rollbacks")


ACCURACY = Metric("acc", "accuracy")
SKILL = Metric("skill", "denoising skill", loss="mse")
# attack-run metrics: per epoch (step = epoch, 0 = before fine-tuning) and at the end (step 0)
RESTRICTED_ACC, RESTRICTED_LOSS = ACCURACY.restricted, ACCURACY.restricted_loss
FINAL, BEST, ORIGINAL_ACC = ACCURACY.final, ACCURACY.best, ACCURACY.original
# search trials: the attacker's own validation accuracy per epoch (its objective), its best over the epochs run,
# and the test accuracy at that epoch (what the attacker's chosen checkpoint scores)
VAL_ACC, VAL_BEST, AT_VAL_BEST = ACCURACY.val, ACCURACY.val_best, ACCURACY.at_val_best
STOPPED = "stopped_early"   # 1 when the scheduler (ASHA) stopped the trial before its last epoch
# search runs: step n = after n trials, the attacker's pick so far (by validation) and its test accuracy
FOUND_VAL, FOUND_TEST = ACCURACY.found_val, ACCURACY.found_test

# the attack grids: which data each fine-tunes on and scores on. development: the protector's share ->
# restricted validation; evaluation and budget: the attacker's pool -> restricted test; benign: a benign
# domain's training split -> its test split; search: the attacker's pool minus its own validation split ->
# that validation split (objective) and the restricted test split (score)
DEVELOPMENT, EVALUATION, BUDGET, BENIGN, SEARCH_GRID = "development", "evaluation", "budget", "benign", "search"
GRIDS = (DEVELOPMENT, EVALUATION, BUDGET, BENIGN)
CELL_GRIDS = (DEVELOPMENT, EVALUATION)   # the grids the held/gap cell analysis reads

# protect-run params and metrics
PROTECT_METRICS = ACCURACY.protect_metrics
# checkpoint selection (protect[i].select_*): why the protection returned its state. A tag (the one-line reason:
# rule, best probe, tie band, cost) and two metrics: the most protected eligible state's iteration, and how many
# probe points less protected the selected state is (0: the selected state is the most protected)
SELECTED_REASON = "selected_reason"
SELECT_BEST_ITERATION, SELECT_PROBE_COST = "select_best_iteration", "select_probe_cost"
SPEC_ARTIFACT = "spec.yaml"      # the resolved spec, at the root of the parent run
REPORT_ARTIFACTS = "report"      # the report files, under this folder of the parent run

# the defender search (protect[i].defend): a defend run per defended variant, a defend-candidate run per candidate
DEFEND_ROLE, CANDIDATE_ROLE = "defend", "defend-candidate"
DEFEND_OBJECTIVE = "defend_objective"   # development worst case minus scratch's best; lower is better
DEV_WORST_CASE = "dev_worst_case"       # the best development attack on the candidate (floored at chance)
DEFEND_DROP = "intactness_drop_val"     # normal minus candidate original-domain validation score
FEASIBLE = "feasible"                   # 1 when the drop is within the guard (else the candidate is not attacked)
CHOSEN_TAG = "chosen_candidate"         # on the defend run: the chosen candidate's key
RED_TEAM_BEST = "red_team_best"         # the development attacker search's best on a candidate (validation)
RED_TEAM_FOUND = "red_team_found"       # a candidate run's tag: its red team's best recipes (JSON)
ROUND = "round"                         # a candidate's defender round (1-based; a param)
