"""The experiment config: every field with the paper's defaults, and its validation.

Experiment files in configs/ start from `base_config()` and change what differs, so a field
that is not here (a typo in a config file) is an error listing the valid ones, and
an unknown ``--config.x=...`` override is one line naming it (`unknown_field`).
"""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections.config_dict import placeholder

from cka_jax import methods
from cka_jax.data.presets import augment_config
from cka_jax.data.sources import default_source_config
from cka_jax.methods.choices import (
    CALIBRATION_KINDS,
    COMPUTE_DTYPES,
    DISTANCE_KINDS,
    DISTANCE_SCALES,
    INTER_FEATURES,
    KL_DIRECTIONS,
    PARALLELISM,
    REDUCTIONS,
    SELECTION_CRITERIA,
    STEMS,
)
from cka_jax.models.catalog import ARCHITECTURE_STAGES

# The loss fields that name a choice, and their valid values.
LOSS_CHOICES = {
    "inter_kind": DISTANCE_KINDS,
    "inter_normalize": DISTANCE_SCALES,
    "inter_features": INTER_FEATURES,
    "intra_reduction": REDUCTIONS,
    "inter_reduction": REDUCTIONS,
    "std_direction": KL_DIRECTIONS,
}


def distributed_config() -> ml_collections.ConfigDict:
    """``config.distributed`` (`cka_jax.infra.distributed`): None fields come from the environment
    or JAX's detection."""
    return ml_collections.ConfigDict(
        dict(
            initialize=False,  # True (or JAX_COORDINATOR_ADDRESS set) joins the processes
            coordinator_address=placeholder(str),  # "host:port" of process 0
            num_processes=placeholder(int),
            process_id=placeholder(int),
        )
    )


def model_config(arch="resnet18", width=64, stem="imagenet", checkpoint="", finetune=False):
    """A model: architecture, first-stage width, stem, and an optional checkpoint.

    A teacher with a checkpoint is loaded and frozen, or, with ``finetune=True``, trained on
    its task starting from it (a new classifier if the class count differs). A student
    always trains, starting from its checkpoint when one is given.
    """
    fields = dict(arch=arch, width=width, stem=stem, checkpoint=checkpoint, finetune=finetune)
    return ml_collections.ConfigDict(fields)


def loss_config() -> ml_collections.ConfigDict:
    """``config.loss``: every term's weight and reading, with the papers' values."""
    return ml_collections.ConfigDict(
        dict(
            kd_temperature=1.0,
            margin=0.4,  # alpha of Eq. 3
            intra_weight=1.0,
            inter_weight=1.0,
            align_weight=10.0,
            std_weight=1.0,
            # Reconstruction guard of the teacher-side common-space heads (CFL Eq. 4).
            recon_weight=10.0,
            cfl_weight=10.0,  # CFL: soft target + 10 * (MMD + reconstruction)
            inter_kind="euclidean",  # Table 3: 'euclidean' | 'cosine' | 'mmd'
            # The readings of the CKA paper's ambiguous equations, chosen by measurement
            # (docs/method.md): with l2-normalised features at T = 1 the transport maps
            # are near uniform and the inter term moves nothing.
            inter_temperature=0.2,  # T of Eq. 5
            inter_normalize="mean",  # Eq. 5's distance scale: 'l2' | 'none' | 'mean'
            inter_features="backbone",  # what Eqs. 5-6 compare: 'backbone' | 'adapted'
            intra_reduction="mean",  # over Eq. 3's negatives: 'mean' | 'sum'
            inter_reduction="mean",  # over Eq. 6's negatives: 'mean' | 'sum'
            # Eq. 11's KL: 'teacher_student' (Hinton's KD) | 'student_teacher' (as written).
            # CKA's soft-target term only; `kd` and `cfl` keep Hinton's direction.
            std_direction="teacher_student",
            # MCL-OKD (the peer methods), its paper's defaults (Sec. 4.1).
            okd_temperature=3.0,  # T of Eqs. 3-5, ensemble -> leader
            contrast_weight=0.025,  # beta of Eq. 12
            nce_temperature=0.1,  # tau of Eq. 6
            nce_negatives=16384,  # S of Eq. 10, capped by the training-set size
            # One uniform draw of S negatives per view pair and step, shared by the batch
            # (a matmul); False draws S per anchor as CRD's code does (a (B, S, d) gather).
            nce_shared_negatives=True,
            memory_momentum=0.5,  # of the memory bank's rows (CRD's value)
            mutual_weight=1.0,  # DML's mutual KL
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """All fields, with the CKA paper's hyper-parameters (Sec. 5.1)."""
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.data = default_source_config("mnist_embedded")
    # Sources beyond `data` for a cross-dataset union (each dataset one task), e.g. Table 5.
    c.union = ()
    # How `data`'s classes become teacher tasks ('shuffle' | 'contiguous'), when no union;
    # or `class_lists`, one tuple of class ids per task, e.g. ((0, 1, 2), (3, 4)).
    c.tasks = ml_collections.ConfigDict(
        dict(num_tasks=2, mode="contiguous", seed=0, class_lists=())
    )
    c.augment = augment_config("imagenet")

    # Teachers: `teacher` is the default for every task; `teachers` (a tuple of dicts with
    # any of arch/width/stem/checkpoint/finetune) overrides it per task, in task order. A checkpoint
    # is loaded and frozen; without one, the teacher is trained on its task's labels.
    c.teacher = model_config("resnet18")
    c.teachers = ()
    c.teacher_epochs = 100
    # Fraction of each task's labelled training images the teachers are trained on (per
    # class, seeded). Below 1 the student, which sees every training image unlabelled, has
    # more data than its teachers, as when specialists were trained on small labelled sets.
    c.teacher_data_fraction = 1.0
    # Fraction of each class of a teacher's labelled images held out of its training (per
    # class, seeded): the teacher's accuracy on them is logged every epoch as `val_acc`, a
    # learning curve that chooses `teacher_epochs` without the test set. 0 trains on all.
    c.teacher_validation_fraction = 0.0
    c.teacher_optimizer = ml_collections.ConfigDict(dict(learning_rate=5e-4, weight_decay=5e-4))

    # How the frozen teachers' outputs become union scores (cka_jax.methods.calibration), fitted
    # once on the unlabelled training images: 'none' distils from the raw concatenation of
    # their logits, as the papers do; the others put the teachers on one scale or route
    # between them. Used by the ensemble row, every student's targets and selection.
    c.teacher_calibration = "none"
    c.calibration_clusters_per_class = 4  # cluster_vote: k-means clusters per union class

    c.student = model_config("resnet18")
    # Fraction of the training images (after the selection hold-out) the students train on:
    # a seeded uniform sample, drawn without labels. Below 1 the students see less than
    # the teachers did, e.g. to size a study; 1 uses every image.
    c.student_data_fraction = 1.0
    c.methods = ("kd", "cfl", "cka")
    # Named variants of a method, usable in `methods` like a method (ablations, student
    # sizes) and sharing this experiment's teachers, e.g.
    #   c.variants = {"cka_cosine": dict(method="cka_inter", loss=dict(inter_kind="cosine")),
    #                 "cka_w4": dict(method="cka", student=dict(width=4)),
    #                 "mcl_okd_branch": dict(method="mcl_okd", peers=dict(shared_stages=3))}
    c.variants = ml_collections.ConfigDict()
    c.seeds = (0,)
    c.epochs = 100
    c.batch_size = 64
    c.eval_batch_size = 256
    c.eval_every = 1  # epochs between test evaluations (and best-model checks); always the last
    c.optimizer = ml_collections.ConfigDict(dict(learning_rate=5e-4, weight_decay=5e-4))
    c.loss = loss_config()
    # The peer methods' students: `peers.num_peers` copies of `student` (the last is the
    # leader, the one deployed), each with a linear `embed_dim` embedding for the contrast.
    # `shared_stages` > 0 makes them branch-based: the stem and that many stages are shared.
    c.peers = ml_collections.ConfigDict(dict(num_peers=4, embed_dim=128, shared_stages=0))
    c.parallelism = "mesh"  # 'mesh' (jit over a device mesh) | 'pmap' | 'single'
    # Computation dtype of every model and head: 'float32' | 'bfloat16'. Parameters, the
    # optimiser state and every loss reduction stay float32 either way.
    c.compute_dtype = "float32"
    # Multi-process runs (cka_jax.infra.distributed): join with JAX's distributed runtime.
    c.distributed = distributed_config()
    # Which model a label-free run keeps (and exports): the final one, or the best by
    # agreement with the teachers' union argmax on `holdout_fraction` of the training images,
    # then held out of every student's training. The test set only reports.
    c.selection = ml_collections.ConfigDict(dict(criterion="final", holdout_fraction=0.1))
    c.log_every = 50
    # Every log_every steps, each loss term's gradient share on the student and the inter
    # term's transport-map peakedness (cka_jax.methods.diagnostics), by a separate jitted function.
    c.diagnostics = True
    # Draw the figures (figures/*.png) at the end. False skips them (a headless job, a quick
    # test); `python -m cka_jax.report --workdir=DIR` draws them later from the workdir.
    c.figures = True
    c.checkpoint_every = 0  # steps; 0 = at each epoch end
    c.keep_checkpoints = 3
    return c


def _check_keys(cfg, reference, path=""):
    for key in cfg.keys():
        if key not in reference:
            valid = ", ".join(sorted(reference.keys()))
            raise ValueError(f"unknown config field '{path}{key}'; valid fields are: {valid}")
        sub, ref = cfg[key], reference[key]
        if isinstance(sub, ml_collections.ConfigDict) and isinstance(
            ref, ml_collections.ConfigDict
        ):
            if key in ("data", "augment", "variants"):  # checked elsewhere
                continue
            _check_keys(sub, ref, f"{path}{key}.")


def _check_model(m, what):
    if m.arch not in ARCHITECTURE_STAGES:
        raise ValueError(f"{what}.arch={m.arch!r} is not one of {sorted(ARCHITECTURE_STAGES)}")
    if m.stem not in STEMS:
        raise ValueError(f"{what}.stem={m.stem!r}: use one of {STEMS}")


def resolve_method(cfg, name: str):
    """Returns ``(method, loss config, student model config)`` for a method or variant name."""
    if name not in cfg.variants:
        return name, cfg.loss, cfg.student
    variant = cfg.variants[name]
    loss = ml_collections.ConfigDict(cfg.loss.to_dict())
    loss.update(dict(variant.get("loss", {})))
    student = ml_collections.ConfigDict(cfg.student.to_dict())
    student.update(dict(variant.get("student", {})))
    return variant.method, loss, student


def resolve_peers(cfg, name: str) -> ml_collections.ConfigDict:
    """``config.peers`` with the overrides of variant ``name`` (e.g. branch-based peers)."""
    peers = ml_collections.ConfigDict(cfg.peers.to_dict())
    if name in cfg.variants:
        peers.update(dict(cfg.variants[name].get("peers", {})))
    return peers


def _check_loss_choices(loss, where: str):
    for field, valid in LOSS_CHOICES.items():
        if loss[field] not in valid:
            raise ValueError(f"{where}.{field}={loss[field]!r}; valid: {valid}")
    if not loss.inter_temperature > 0:
        raise ValueError(
            f"{where}.inter_temperature must be positive, got {loss.inter_temperature}"
        )


def _check_peers(peers, arch: str, where: str):
    stages = len(ARCHITECTURE_STAGES[arch])
    if peers.num_peers < 2 or peers.embed_dim < 1 or not 0 <= peers.shared_stages < stages:
        raise ValueError(
            f"{where} needs num_peers >= 2, embed_dim >= 1 and 0 <= shared_stages < "
            f"{stages} (the student's stages), got {peers.to_dict()}"
        )


def _check_variants(cfg):
    allowed = {"method": None, "loss": cfg.loss, "student": cfg.student, "peers": cfg.peers}
    for name, variant in cfg.variants.items():
        where = f"config.variants.{name}"
        if name in methods.METHODS:
            raise ValueError(
                f"{where}: the name is a built-in method or a registered one; choose another"
            )
        if variant.get("method") not in methods.METHODS:
            raise ValueError(
                f"{where}.method={variant.get('method')!r}; valid: {', '.join(methods.METHODS)}"
            )
        for key, value in variant.items():
            if key not in allowed:
                raise ValueError(f"{where} has unknown field {key!r}; valid: {sorted(allowed)}")
            if key != "method":
                unknown = set(value.keys()) - set(allowed[key].keys())
                if unknown:
                    raise ValueError(
                        f"{where}.{key} has unknown fields {sorted(unknown)}; "
                        f"valid: {sorted(allowed[key].keys())}"
                    )
        _, loss, student = resolve_method(cfg, name)
        _check_loss_choices(loss, f"{where}.loss")
        _check_model(student, f"{where}.student")
        _check_peers(resolve_peers(cfg, name), student.arch, f"{where}.peers")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first wrong field and the valid choices."""
    _check_keys(cfg, base_config())
    _check_variants(cfg)
    bad = [m for m in cfg.methods if m not in methods.METHODS and m not in cfg.variants]
    if bad:
        raise ValueError(
            f"unknown method(s) {bad} in config.methods; valid methods are "
            f"{', '.join(methods.METHODS)} or a name in config.variants "
            f"({', '.join(cfg.variants.keys()) or 'none defined'}); teacher and ensemble rows "
            "are always reported"
        )
    for name in cfg.methods:
        base, loss, student = resolve_method(cfg, name)
        if methods.build_method(base, loss).peers and student.checkpoint:
            raise ValueError(
                f"method {name!r} trains its peers from scratch, but its student.checkpoint="
                f"{student.checkpoint!r} is set; clear it for the peer methods"
            )
    if not cfg.seeds:
        raise ValueError("config.seeds is empty: give at least one integer seed")
    if cfg.parallelism not in PARALLELISM:
        raise ValueError(f"config.parallelism={cfg.parallelism!r}; valid: {PARALLELISM}")
    if not 0 < cfg.student_data_fraction <= 1:
        raise ValueError(
            f"config.student_data_fraction must lie in (0, 1], got {cfg.student_data_fraction}"
        )
    if cfg.teacher_calibration not in CALIBRATION_KINDS:
        raise ValueError(
            f"config.teacher_calibration={cfg.teacher_calibration!r}; valid: {CALIBRATION_KINDS}"
        )
    if int(cfg.calibration_clusters_per_class) < 1:
        raise ValueError(
            "config.calibration_clusters_per_class must be a positive integer, got "
            f"{cfg.calibration_clusters_per_class}"
        )
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={cfg.compute_dtype!r}; valid: {COMPUTE_DTYPES}")
    _check_loss_choices(cfg.loss, "config.loss")
    if not 0 < cfg.teacher_data_fraction <= 1:
        raise ValueError(
            f"config.teacher_data_fraction must lie in (0, 1], got {cfg.teacher_data_fraction}"
        )
    if not 0 <= cfg.teacher_validation_fraction < 1:
        raise ValueError(
            "config.teacher_validation_fraction must lie in [0, 1), got "
            f"{cfg.teacher_validation_fraction}"
        )
    if cfg.selection.criterion not in SELECTION_CRITERIA:
        raise ValueError(
            f"config.selection.criterion={cfg.selection.criterion!r}; valid: {SELECTION_CRITERIA}"
        )
    if cfg.selection.criterion != "final" and not 0 < cfg.selection.holdout_fraction < 1:
        raise ValueError(
            "config.selection.holdout_fraction must lie in (0, 1), got "
            f"{cfg.selection.holdout_fraction}"
        )
    for field in ("epochs", "teacher_epochs", "batch_size", "eval_batch_size", "eval_every"):
        if int(cfg[field]) < (0 if field == "teacher_epochs" else 1):
            raise ValueError(f"config.{field} must be a positive integer, got {cfg[field]}")
    _check_model(cfg.student, "student")
    _check_model(cfg.teacher, "teacher")
    _check_peers(cfg.peers, cfg.student.arch, "config.peers")
    for t, override in enumerate(cfg.teachers):
        unknown = set(override) - set(cfg.teacher.keys())
        if unknown:
            raise ValueError(
                f"config.teachers[{t}] has unknown fields {sorted(unknown)}; "
                f"valid: {sorted(cfg.teacher.keys())}"
            )


def unknown_field(cfg: ml_collections.ConfigDict, path: str) -> str | None:
    """For an override path such as ``student.widht``, one line naming the first part that
    ``cfg`` lacks, the closest valid name and the valid fields at that level; None if every
    part exists (or the path goes into a tuple, which this does not follow)."""
    node, where = cfg, "config"
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or "[" in key:
            return None
        if key not in node:
            valid = sorted(node.keys())
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            fields = ", ".join(valid) or "(none)"
            return f"{where} has no field '{key}'; {hint}valid fields: {fields}"
        node, where = node[key], f"{where}.{key}"
    return None
