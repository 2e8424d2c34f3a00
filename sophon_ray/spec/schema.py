"""The sweep spec's schema: frozen, typed dataclasses, one per section. The attack grids' axes
(``GridSpec``) and the search space (``SearchSpace``) are derived from the recipe table
(:mod:`sophon_ray.recipes`). Building from YAML is :mod:`sophon_ray.spec.loader`; the checks against the recipe
table and the modes are :mod:`sophon_ray.run.validate`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any
from pathlib import Path

# HASHED: field-metadata key, False for a field that does not change results (no hash depends on it);
# UNLESS_DEFAULT: hashed only when it differs from its default (a field added later)
from sophon_ray.recipes import HASHED, UNLESS_DEFAULT, AttackConfig, GridSpec, Range, SearchSpace

SUBJECTS = ("protected", "normal", "scratch")
DATA_POOLS = ("disjoint", "shared")
RESTRICTED_VAL_FRACTION = 0.2  # of each restricted training split: the protector's validation data
# A generation timestep policy as a spec writes it: ``uniform`` (t ~ U{0..T-1}), ``one`` (t = 1), a fixed timestep t
# (an integer, 0-based like the schedule) or a band [t_min, t_max] (t ~ U{t_min..t_max}, both ends included)
TimestepPolicy = str | int | tuple[int, int]


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "convnet"
    num_classes: int = 10
    # NHWC ("channels last") weights and activations: same function, other rounding. Measured faster for the
    # convnet (1.4x) and ResNet-18 (1.14x) training steps on CPU and for ResNet-18 on an H200 (1.3-1.5x);
    # BENCHMARKS.md. false keeps PyTorch's default (contiguous) layout.
    channels_last: bool = True


@dataclass(frozen=True)
class DomainSpec:
    """One data domain. Procedural sets use ``train_size``/``test_size``/``seed`` to generate; file-backed
    sets use ``root``/``download`` and treat the sizes as caps (a seeded subset)."""

    dataset: str = "shapes"
    image_size: int = 16
    channels: int = 3
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class PretrainSpec:
    """Supervised training of the normal model, or ``weights``: a sophon-ray checkpoint directory, or
    ``torchvision`` for the architecture's published ImageNet weights (downloads; body only)."""

    epochs: int = 5
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    weights: str | None = None
    val_fraction: float = 0.1


@dataclass(frozen=True)
class EnvironmentSpec:
    """The fine-tuning environments FTS samples from, one per simulation.

    ``lr`` is a log-uniform range [low, high]; ``head_reinit`` and ``head_only`` are probabilities.
    The official code's single environment is ``{optimizers: [sgd], lr: [1e-4, 1e-4]}``.

    ``recipes`` (a search space, ``attack.search[].space`` syntax): each simulation draws its attacker from the
    recipe space instead (strategy, optimizer, lr, weight decay, schedule, label smoothing, augmentation, BatchNorm
    mode, reparameterisation; the inner loop's ``inner_steps`` on protection batches stand for epochs, batch size
    and data fraction), so the protection trains against what the tool can attack with. ``known``: explicit
    recipes (a defender's red team's finds), one of them drawn with probability ``known_share``.
    """

    optimizers: tuple[str, ...] = ("sgd",)
    lr: tuple[float, float] = (1e-4, 1e-4)
    head_reinit: float = 0.0
    head_only: float = 0.0
    recipes: SearchSpace | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    known: tuple[AttackConfig, ...] = field(default=(), metadata={HASHED: UNLESS_DEFAULT})
    known_share: float = field(default=0.5, metadata={HASHED: UNLESS_DEFAULT})


@dataclass(frozen=True)
class ProbeSpec:
    """One probe attack: a short fine-tuning on the protector's restricted share, scored on restricted
    *validation* data, that rates a state of the protection for checkpoint selection. Probes belong to the
    development side of the protocol: ``validate`` warns when one is also an evaluation cell."""

    strategy: str = "initfc-all"
    optimizer: str = "momentum"
    lr: float = 3e-3
    batch_size: int = 64
    data_fraction: float = 0.2


DEFAULT_PROBES = (ProbeSpec("initfc-all", "momentum", 3e-3), ProbeSpec("direct-all", "adam", 3e-4))


NUMBER_DIMENSION = tuple[float, ...] | Range | None   # a list of values or a range; None: not searched


@dataclass(frozen=True)
class DefendSpace:
    """What a defender search may choose for a protect variant: any protection setting (a list of values, or for
    a number a range; unset: the variant's own value) and the simulated attacker's distribution (``env_*``:
    the environments' optimizer sets, lr range ends, head re-init and head-only probabilities)."""

    loss: tuple[str, ...] | None = None
    iterations: tuple[int, ...] | None = None
    inner_steps: tuple[int, ...] | None = None
    ntr_steps: tuple[int, ...] | None = None
    batch_size: tuple[int, ...] | None = None
    base_lr: NUMBER_DIMENSION = None
    alpha: NUMBER_DIMENSION = None
    beta: NUMBER_DIMENSION = None
    query_fraction: NUMBER_DIMENSION = None
    clip_norm: NUMBER_DIMENSION = None
    # generation mode: the suppression losses' timestep policies (hashed only when set: old sweep ids stay)
    suppression_t: tuple[str, ...] | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    env_optimizers: tuple[tuple[str, ...], ...] | None = None
    env_lr_low: NUMBER_DIMENSION = None
    env_lr_high: NUMBER_DIMENSION = None
    env_head_reinit: NUMBER_DIMENSION = None
    env_head_only: NUMBER_DIMENSION = None

    def fixed(self) -> dict[str, Any]:
        """The one-value fields (set, not searched): name -> that value."""
        return {f.name: getattr(self, f.name)[0] for f in fields(self)
                if isinstance(getattr(self, f.name), tuple) and len(getattr(self, f.name)) == 1}


@dataclass(frozen=True)
class RedTeamSpec:
    """The development attacker search every feasible defender candidate meets after its development grid (in its
    trial, on the protector's share, scored on restricted validation data): ``num_samples`` recipes drawn from
    ``space`` (``attack.search[].space`` syntax) by Optuna (``algorithm`` tpe, ``random_start`` random first, or
    random; seeded by ``seed``). Its best counts in the candidate's development worst case. With ``defend.rounds``
    > 1 the ``join`` best recipes of each round's chosen candidate join the next round: its simulated attacker
    (``environments.known``, drawn with probability ``share``) and its development grid."""

    num_samples: int = 8
    algorithm: str = "tpe"
    random_start: int = 4
    seed: int = 0
    join: int = 2
    share: float = 0.5
    space: SearchSpace = field(default_factory=SearchSpace)


@dataclass(frozen=True)
class DefendSpec:
    """A defender search (Ray Tune) over a protect variant's settings, run before the variant is protected: each
    candidate is one protection (a Ray Train job inside the Tune trial, protection seed ``seed``) and its
    development attacks (the development grid on the protector's share, scored on restricted *validation*
    data). ``objective`` development: the best development attack on the candidate minus the best on scratch
    (lower is better); a candidate whose original-domain validation drop exceeds ``guard`` points is infeasible.
    ``algorithm`` tpe (``random_start`` random first) or random; ``scheduler`` asha stops candidates on their probe
    estimate at every probe checkpoint (``grace_period`` probes first). ``red_team``: a development attacker
    search per feasible candidate (:class:`RedTeamSpec`); ``rounds`` (> 1 needs a red team): the search runs again,
    ``num_samples`` candidates a round, each round's simulated attacker and development grid joined by the red
    team's best recipes against the previous round's choice (red team, then blue team, again). The best feasible
    candidate (of the last round) becomes the variant's setting for every seed."""

    space: DefendSpace = field(default_factory=DefendSpace)
    objective: str = "development"
    algorithm: str = "tpe"
    num_samples: int = 8
    max_concurrent: int = 1
    random_start: int = 4
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    guard: float = 2.0
    seed: int = 0
    rounds: int = field(default=1, metadata={HASHED: UNLESS_DEFAULT})
    red_team: RedTeamSpec | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})


DEFEND_OBJECTIVES = ("development",)
# protect[i].select_prefer: which probed state checkpoint selection returns among those it counts as equal
SELECT_PREFER = ("original", "protection")


@dataclass(frozen=True)
class ProtectSpec:
    """One SOPHON variant, protected once per seed in ``seeds`` (one Ray Train job and checkpoint each).

    ``max_drop`` (points below the normal model's original validation accuracy) is the rollback floor, a
    guard against collapse (the official code's floor is 80% absolute); ``select_drop`` is the stricter
    intactness bound a probed checkpoint must meet to be selected; ``probes`` rate the probed states.
    ``checkpoint_every``: iterations between state checkpoints that a restarted worker group or ``--resume``
    continue from (0: none); it does not change the result, so no key or sweep id depends on it.
    ``suppression_t`` (generation mode only): the timestep policy of this variant's suppression losses
    (:data:`TimestepPolicy`: ``uniform``, ``one``, a fixed t or a band [t_min, t_max]); None: the sweep's
    ``generation.suppression_t``. Hashed only when set, so the keys of variants without it are what they were
    before the field existed.

    Checkpoint selection among the probed states that meet the ``select_drop`` floor (:data:`SELECT_PREFER`):
    ``select_prefer: protection`` returns the lowest probe score (the most protected state; ``select_tolerance``
    is then unused); ``original`` counts probe scores within ``select_tolerance`` points of the lowest as equal
    and returns the best original-domain score among them, which can be a less protected state. The defaults
    (5.0, ``original``) are the rule from before these were settings, kept so that every existing protection key
    still names the model it was computed as; both are hashed only when changed, ``validate`` warns about the
    default and every protection logs why it chose its state (``selected_reason``).
    """

    name: str | None = None
    loss: str = "ice"
    iterations: int = 200
    inner_steps: int = 50
    base_lr: float = 1e-4
    alpha: float = 3.0
    beta: float = 5.0
    ntr_steps: int = 1
    batch_size: int = 100
    query_fraction: float = 0.1
    clip_norm: float = 0.5
    max_drop: float = 20.0
    select_drop: float = 2.0
    max_rollbacks: int = 10
    eval_every: int = 10
    probe_every: int = 50
    probe_epochs: int = 3
    probes: tuple[ProbeSpec, ...] = DEFAULT_PROBES
    seeds: tuple[int, ...] = (0,)
    environments: EnvironmentSpec = field(default_factory=EnvironmentSpec)
    checkpoint_every: int = field(default=50, metadata={HASHED: False})
    defend: DefendSpec | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    suppression_t: TimestepPolicy | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    # checkpoint selection's tie rule (see the docstring's last paragraph); hashed only when changed
    select_tolerance: float = field(default=5.0, metadata={HASHED: UNLESS_DEFAULT})
    select_prefer: str = field(default="original", metadata={HASHED: UNLESS_DEFAULT})

    @property
    def label(self) -> str:
        return self.name or self.loss


@dataclass(frozen=True)
class SearchSpec:
    """An adaptive attacker: a Ray Tune search (``algorithm`` tpe: Optuna's TPE sampler, or random) of
    ``num_samples`` fine-tuning recipes per attacked model and restricted domain, ``max_concurrent`` at a
    time, bad trials stopped on their per-epoch validation curve by ``scheduler`` asha (or none: fifo).

    The attacker's objective is its own validation accuracy: ``val_fraction`` of its data pool is held out,
    the rest is what it fine-tunes on (``data_fraction`` of it), and each trial keeps its best-validation
    epoch. The restricted test split only scores the recipes found. Every attacked model (protected,
    normal, scratch) gets the same search with the same budget."""

    name: str = "search"
    algorithm: str = "tpe"
    num_samples: int = 32
    max_concurrent: int = 2
    random_start: int = 8         # tpe: trials drawn at random before the model of good recipes is used
    scheduler: str = "asha"
    grace_period: int = 2         # asha: epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0
    val_fraction: float = 0.2
    seed: int = 0
    space: SearchSpace = field(default_factory=SearchSpace)


DISTRIBUTIONS = ("loguniform", "uniform", "choice")
SEARCH_ALGORITHMS = ("tpe", "random")
SCHEDULERS = ("asha", "none")


@dataclass(frozen=True)
class AttackSpec:
    """The attacks, on two grids (each a list of grids whose cells are united):

    - ``evaluation``: the reported grid. Attackers fine-tune on their own pool of the restricted training
      split and are scored on the restricted *test* split.
    - ``development``: the only grid that protection settings, probes and checkpoint choice may be tuned
      on. Attackers fine-tune on the protector's restricted share and are scored on restricted
      *validation* data.

    - ``budget``: how far an attacker gets with more epochs and data (the evaluation grid's data; one trial
      per recipe and data fraction, its per-epoch curve read at every epoch).
    - ``benign``: fine-tuning on the unrelated ``benign`` domains (their training split -> their test split),
      where the protected model should do as well as the normal one.
    - ``search``: adaptive attackers (:class:`SearchSpec`).

    ``data_pool``: ``disjoint`` (default) gives the attacker ``pool_fraction`` of the restricted training
    split that the protector never sees; ``shared`` lets the attacker draw from the whole split, the
    protector's share included.

    ``pack``: the most grid trials run as one Tune trial (one packed fine-tuning, :mod:`sophon_ray.core.packed`):
    1 (default) runs every trial alone; ``n`` > 1 trains up to ``n`` trials of one attacked model, grid and domain
    whose recipes differ only in per-member settings (lr, weight decay, schedule, augmentation, seed, ...) together,
    each still its own MLflow run with the same params and curves; ``auto`` picks the size
    (:func:`sophon_ray.run.packing.pack_size`). Trials that cannot pack run alone (the dry run says which and why).
    Not hashed: it changes how trials run, not their results (up to float32 rounding).
    """

    subjects: tuple[str, ...] = SUBJECTS
    evaluation: tuple[GridSpec, ...] = (GridSpec(),)
    development: tuple[GridSpec, ...] = ()
    budget: tuple[GridSpec, ...] = ()
    benign: tuple[GridSpec, ...] = ()
    search: tuple[SearchSpec, ...] = ()
    data_pool: str = "disjoint"
    pool_fraction: float = 0.5
    pack: int | str = field(default=1, metadata={HASHED: False})


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources. ``protect_workers``: data-parallel workers of one protection (Ray Train);
    ``protect_parallel``: protections (variants x seeds) run at once, each its own Ray Train run.
    ``storage_path``: where Ray Train/Tune keep their state (default ``<output_dir>/ray``); on a multi-node
    cluster a shared path (NFS, s3://...)."""

    protect_workers: int = 1
    protect_parallel: int = 1
    use_gpu: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    storage_path: str | None = None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None


# the stages of generation mode that take a timestep policy (GenerationSpec fields): the fit loss of pretraining and
# NTR, of the simulated attacker inside the protection and of the real attacker (and the probes); the suppression
# loss; the score (also the name ``eval_t``: the mean error at the fixed list ``generation.eval_t``)
TIMESTEP_STAGES = ("fit_t", "simulate_t", "attack_t", "suppression_t", "score_t")
SCORE_EVAL_T = "eval_t"
# generation.protocol: what every stage that a spec leaves unset gets. ddpm (default): uniform fitting everywhere (how
# anyone fine-tunes a diffusion model), uniform suppression, the score at eval_t (the behaviour before stages
# existed). official: t = 1 everywhere, as the official SOPHON code runs (its DDPM trainer and tester draw
# randint(1, 2)), the score included.
PROTOCOLS: dict[str, dict[str, TimestepPolicy]] = {
    "ddpm": {"fit_t": "uniform", "simulate_t": "uniform", "attack_t": "uniform", "suppression_t": "uniform",
             "score_t": SCORE_EVAL_T},
    "official": dict.fromkeys(TIMESTEP_STAGES, 1),
}
DEFAULT_PROTOCOL = "ddpm"


def _policy(value: Any) -> Any:
    """A band given as a list (Python callers) as the tuple a spec file gives."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class GenerationSpec:
    """Generation mode's DDPM settings (``mode: generation``; ignored in classification mode).

    The timestep policy of each stage (:data:`TimestepPolicy`: ``uniform``, ``one``, a fixed t or a band
    [t_min, t_max]): ``fit_t`` the DDPM loss of pretraining and NTR, ``simulate_t`` the simulated attacker's inside
    the protection, ``attack_t`` the real attacker's fine-tuning (and the protection's probes, which are attacks),
    ``suppression_t`` the suppression losses (DoS, negative MSE), ``score_t`` the score (``eval_t``: the mean
    error at the fixed timesteps ``eval_t``; a policy: the error under it, exact for a fixed t). A stage left unset
    (null) takes ``protocol``'s value (:data:`PROTOCOLS`: ``ddpm``, the default, is uniform fitting and
    suppression and the score at ``eval_t``; ``official`` is t = 1 everywhere); :meth:`stage` reads a stage.
    ``eval_t`` are the fixed timesteps of the denoising-error metric (common random noise, seeded by
    ``eval_seed``), logged per timestep on every evaluation. ``samples`` images are drawn (``sample_steps``
    respaced ancestral steps; null: all T) for the sample grids before and after an attack (0: none) and, with
    ``sample_quality``, scored by KID and recognisability in an offline-trained restricted-domain classifier's
    features; FID (``sample_fid_standard``, the standard FID network of pytorch-fid and torch-fidelity) when
    ``fid_inception`` is the path of its weights file, and the Frechet distance in torchvision's ImageNet
    Inception-v3 (``sample_frechet_imagenet``: not FID) when ``imagenet_inception`` (or torchvision's cache) holds
    those weights. Neither path changes a result's key; nothing is downloaded."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    suppression_t: TimestepPolicy | None = None
    eval_t: tuple[int, ...] = (1, 10, 100, 250, 500)
    eval_seed: int = 0
    samples: int = 16
    sample_steps: int | None = 100
    sample_quality: bool = True
    # local weights files (paths change no result): torchvision's ImageNet inception_v3 state dict (it was called
    # fid_weights, but its score is not FID), and the standard FID Inception network's (pt_inception-2015-12-05)
    imagenet_inception: str | None = field(default=None, metadata={HASHED: False})
    fid_inception: str | None = field(default=None, metadata={HASHED: False})
    # added with the stages: hashed only when set, so nothing keyed before they existed changes
    protocol: str = field(default=DEFAULT_PROTOCOL, metadata={HASHED: UNLESS_DEFAULT})
    fit_t: TimestepPolicy | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    simulate_t: TimestepPolicy | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    attack_t: TimestepPolicy | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})
    score_t: TimestepPolicy | None = field(default=None, metadata={HASHED: UNLESS_DEFAULT})

    def stage(self, name: str) -> TimestepPolicy:
        """The timestep policy of stage ``name`` (a :data:`TIMESTEP_STAGES` field): its own value when set, else
        ``protocol``'s. KeyError (naming the allowed values) for an unknown stage or protocol."""
        if name not in TIMESTEP_STAGES:
            raise KeyError(f"unknown timestep stage {name!r}; allowed: {', '.join(TIMESTEP_STAGES)}")
        value = getattr(self, name)
        if value is not None:
            return _policy(value)
        if self.protocol not in PROTOCOLS:
            raise KeyError(f"unknown generation.protocol {self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        return PROTOCOLS[self.protocol][name]

    def resolved(self) -> GenerationSpec:
        """These settings with every stage filled in (:meth:`stage`)."""
        return replace(self, **{name: self.stage(name) for name in TIMESTEP_STAGES})

    def changed_stages(self, which: tuple[str, ...] = TIMESTEP_STAGES) -> dict[str, TimestepPolicy]:
        """The stages among ``which`` whose policy differs from the default protocol's (what a result keyed
        before the stages existed was made with): name -> policy."""
        default = PROTOCOLS[DEFAULT_PROTOCOL]
        return {name: self.stage(name) for name in which if self.stage(name) != default[name]}


@dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    seed: int = 0
    mode: str = "classification"
    output_dir: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    original: DomainSpec = field(default_factory=DomainSpec)
    restricted: tuple[DomainSpec, ...] = (DomainSpec(dataset="digits"),)
    benign: tuple[DomainSpec, ...] = ()   # unrelated domains for attack.benign (never protected against)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    protect: tuple[ProtectSpec, ...] = (ProtectSpec(),)
    attack: AttackSpec = field(default_factory=AttackSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec, metadata={HASHED: UNLESS_DEFAULT})

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


__all__ = ["SUBJECTS", "DATA_POOLS", "RESTRICTED_VAL_FRACTION", "HASHED", "UNLESS_DEFAULT", "ModelSpec", "DomainSpec", "PretrainSpec", "EnvironmentSpec", "ProbeSpec", "DEFAULT_PROBES", "DefendSpace", "DefendSpec", "RedTeamSpec", "DEFEND_OBJECTIVES", "ProtectSpec", "GridSpec", "Range", "DISTRIBUTIONS", "SearchSpace", "SearchSpec", "SEARCH_ALGORITHMS", "SCHEDULERS", "AttackSpec", "ResourcesSpec", "TrackingSpec", "GenerationSpec", "SweepSpec", "TimestepPolicy", "TIMESTEP_STAGES", "SCORE_EVAL_T", "PROTOCOLS", "DEFAULT_PROTOCOL"]
