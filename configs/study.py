"""The reproduction study's experiments (docs/results.md), one per config argument.

    python -m cka_jax.main --config=configs/study.py:cifar10 --workdir=runs/study/cifar10/seed_0 \
        --config.data.root=~/data/cifar10

`scripts/reproduce.py` runs them over seeds and writes the tables and figures.

Natural images (the study that leads docs/results.md; data paths are config fields):
  cifar10     Table 2 on CIFAR-10 (an image folder, ``data.root``): two teachers on 5 + 5
              classes, each trained on 10% of its task's labelled images; plus the Table 3
              variants the diagnostics single out (docs/method.md): Eq. 5 at the first
              version's reading (l2, T = 1: inert maps) and as written (raw features, T = 1),
              and CKA-Inter with the cosine and MMD distances.
  cifar10_t4  4 teachers (3 + 3 + 2 + 2 classes) on CIFAR-10: ensemble, KD, CKA.
  fmnist      Table 2 on Fashion-MNIST (IDX files, ``data.root``): two teachers on 5 + 5.

Embedded MNIST (``<experiment>`` or ``<experiment>,<dataset>``):
  base       Table 2 on the embedded default's recipe: teachers on 25% of their digits.
  hard       Table 2 with weaker teachers (10% of their digits, as in the paper's setting of
             specialists trained on small labelled sets), plus the Table 3 ablations.
  hetero     Table 4: a resnet10 and a resnet18 teacher (resnet18 and resnet34 on a paper
             dataset); KD and CKA students, and CKA students of half and double width.
  teachers3  CFL Table 6: 3 teachers on disjoint digit splits (4|3|3 digits).
  teachers4  4 teachers (3|3|2|2 digits).
  okd        MCL-OKD (Yang et al., multi-view contrastive online KD): 4 peer networks trained
             with labels on 50 digits per class; the network trained alone, 4 independent
             peers, DML, MCL-OKD, MCL-OKD with KD from the two teachers (its Table 4), and
             branch-based independent peers and MCL-OKD (its Table 2).
The optional dataset (dogs, cars, cub, aircraft) starts from that paper config (its models,
image size and 100 epochs) instead of the embedded MNIST at study scale; the setting's other
changes (teacher data fraction, methods, variants, teacher count) apply the same way.

Study scale on MNIST: digits resized to 16 px, resnet10 of width 8 (78K parameters) for
teachers and students, 5 student epochs over the 4,000 training digits, so that the whole
study fits in an hour on a 2-core CPU. configs/default.py is the same recipe at 28 px, width
16 and 12 epochs.
"""

import importlib

from cka_jax.config import base_config, model_config
from cka_jax.data import augment_config, default_source_config
from cka_jax.data.idx import FASHION_MNIST_CLASS_NAMES

TABLE2_METHODS = ("supervised", "kd", "cfl", "cka_intra", "cka_inter", "cka")

# Table 3: every variant drops or swaps one part of CKA (Eq. 12). Intra off is CKA-Inter and
# inter off is CKA-Intra, both already in Table 2.
ABLATIONS = {
    "cka_inter_cosine": dict(method="cka_inter", loss=dict(inter_kind="cosine")),
    "cka_inter_mmd": dict(method="cka_inter", loss=dict(inter_kind="mmd")),
    "cka_no_align": dict(method="cka", loss=dict(align_weight=0.0)),
    "cka_no_recon": dict(method="cka", loss=dict(recon_weight=0.0)),
}


def student_sizes(width: int) -> dict:
    """Table 4's students: CKA with half and double the default student width."""
    return {
        f"cka_w{width // 2}": dict(method="cka", student=dict(width=width // 2)),
        f"cka_w{width * 2}": dict(method="cka", student=dict(width=width * 2)),
    }


MNIST_EXPERIMENTS = ("base", "hard", "hetero", "teachers3", "teachers4", "okd")
NATURAL_EXPERIMENTS = ("cifar10", "cifar10_t4", "fmnist")
# The strong-teacher study (docs/results.md leads with it): teachers trained on every
# labelled image of their task, students trained to convergence, three task layouts.
STRONG_EXPERIMENTS = (
    "strong_mixed",
    "strong_mixed_calibrated",
    "strong_domain",
    "strong_union",
)
# Experiments that distil from another's teachers (scripts/reproduce.py trains them once).
SHARED_TEACHERS = {"strong_mixed_calibrated": "strong_mixed"}
# The label-free routing calibration the strong study's calibrated rows use: the best
# ensemble on the strong teachers' held-out training images (scripts/routing_screen.py;
# docs/results.md), by 0.2 points, which the screen cannot tell from none.
STUDY_CALIBRATION = "standardize"
EXPERIMENTS = STRONG_EXPERIMENTS + NATURAL_EXPERIMENTS + MNIST_EXPERIMENTS
# The readings of Eq. 5 that the diagnostics single out: the first version's (inert maps)
# and the paper's literal one (raw features, T = 1), and Table 3's inter distances.
NATURAL_ABLATIONS = {
    "cka_l2_t1": dict(method="cka", loss=dict(inter_normalize="l2", inter_temperature=1.0)),
    "cka_raw_t1": dict(method="cka", loss=dict(inter_normalize="none", inter_temperature=1.0)),
    "cka_inter_cosine": dict(method="cka_inter", loss=dict(inter_kind="cosine")),
    "cka_inter_mmd": dict(method="cka_inter", loss=dict(inter_kind="mmd")),
}
# Study scale on natural images (measured to fit the whole study in 2 hours on 2 cores).
NATURAL_SCALE = dict(
    width=8, train_per_class=2000, epochs=2, teacher_fraction=0.1, teacher_epochs=12
)
OKD_METHODS = ("supervised", "independent", "dml", "mcl_okd", "mcl_okd_kd")
# Branch-based peers (MCL-OKD's Table 2; ONE's layout): the stem and first 3 of the 4 stages
# shared, one branch per peer from the last stage on.
OKD_BRANCH_VARIANTS = {
    f"{method}_branch": dict(method=method, peers=dict(shared_stages=3))
    for method in ("independent", "mcl_okd")
}


def mnist_study_config():
    default = importlib.import_module("configs.default").get_config()
    default.teacher = model_config("resnet10", width=8, stem="small")
    default.student = model_config("resnet10", width=8, stem="small")
    # 16 px digits (resized on load) cost a third of 28 px ones; supervised still gets 95%.
    default.data.image_size = 16
    default.augment.out_size = 16
    default.epochs = 5
    default.teacher_epochs = 10
    default.log_every = 1000
    return default


def natural_config(source, augment, name: str):
    """The natural-image study's recipe around ``source``: resnet10 teachers and student of
    `NATURAL_SCALE` width on 10% of their task's labelled images; the student sees
    `train_per_class` unlabelled images per class."""
    scale = NATURAL_SCALE
    c = base_config()
    c.name = name
    c.data = source
    c.data.train_per_class = scale["train_per_class"]
    c.augment = augment
    c.teacher = model_config("resnet10", width=scale["width"], stem="small")
    c.student = model_config("resnet10", width=scale["width"], stem="small")
    c.tasks.mode = "contiguous"
    c.teacher_data_fraction = scale["teacher_fraction"]
    c.teacher_epochs = scale["teacher_epochs"]
    c.epochs = scale["epochs"]
    c.batch_size = 64
    c.eval_batch_size = 500
    c.optimizer.learning_rate = 2e-3
    c.teacher_optimizer.learning_rate = 2e-3
    c.loss.kd_temperature = 4.0
    c.log_every = 100
    c.methods = TABLE2_METHODS
    return c


def cifar10_source(root="~/data/cifar10"):
    source = default_source_config("image_folder")
    source.update(root=root, image_size=32, resize="stretch", channels=3)
    return source


def fashion_mnist_source(root="/usr/share/datasets/fashion-mnist"):
    source = default_source_config("idx")
    source.update(root=root, class_names=FASHION_MNIST_CLASS_NAMES)
    return source


def natural_experiment(experiment: str):
    if experiment == "fmnist":
        c = natural_config(fashion_mnist_source(), augment_config("mnist"), "Fashion-MNIST")
        c.augment.flip = True  # clothes, unlike digits, have no handedness
        return c
    c = natural_config(cifar10_source(), augment_config("cifar"), "CIFAR-10")
    if experiment == "cifar10":
        c.variants = NATURAL_ABLATIONS
        c.methods = TABLE2_METHODS + tuple(NATURAL_ABLATIONS)
    else:  # cifar10_t4
        c.tasks.num_tasks = 4
        c.methods = ("kd", "cka")
    c.name = f"study: {experiment}"
    return c


CIFAR10_VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck
CIFAR10_ANIMALS = (2, 3, 4, 5, 6, 7)
# Sized by the pilots (docs/results.md): width-16 teachers reach 86-91% within their task in
# 30 epochs (held-out curve flat by then); students see 40% of the training images for 16
# epochs (KD's held-out agreement still rises 0.9 over the last fifth there: the compute this
# machine has, not convergence; docs/results.md says so).
STRONG_SCALE = dict(
    teacher_width=16, student_width=16, teacher_epochs=30, epochs=16, student_fraction=0.4
)
# Every Table 2 row on the mixed split; KD, CKA and the supervised reference on the other two
# layouts (the compute a 2-core machine has: docs/results.md).
STRONG_FULL_TABLE = ("kd", "cka", "cfl", "cka_intra", "cka_inter", "supervised")
STRONG_CORE = ("kd", "cka", "supervised")


def strong_experiment(experiment: str):
    """Strong teachers (all labelled images of their task) and converged students, sizes
    in `STRONG_SCALE`; the layouts: CIFAR-10's classes 0-4 | 5-9 (animals and vehicles
    mixed), vehicles | animals (tasks from different domains), and CIFAR-10 + Fashion-MNIST
    (one teacher per dataset, Fashion-MNIST at 32 px, tiled to RGB)."""
    scale = STRONG_SCALE
    c = natural_config(cifar10_source(), augment_config("cifar"), f"study: {experiment}")
    c.data = cifar10_source()  # every training image (an int field may still override it)
    c.teacher = model_config("resnet10", width=scale["teacher_width"], stem="small")
    c.student = model_config("resnet10", width=scale["student_width"], stem="small")
    c.teacher_data_fraction = 1.0
    # The teachers' learning curves on images they never train on (nor any other teacher).
    c.teacher_validation_fraction = 0.1
    c.teacher_epochs = scale["teacher_epochs"]
    c.epochs = scale["epochs"]
    c.student_data_fraction = scale["student_fraction"]
    # Every epoch scores each student's agreement with the teachers on held-out unlabelled
    # images: the label-free learning curve; the final student is still the one reported.
    c.selection.criterion = "teacher_agreement"
    # KD and CKA first: their learning curves sized the student epochs.
    c.methods = STRONG_FULL_TABLE
    if experiment == "strong_mixed_calibrated":
        c.teacher_calibration = STUDY_CALIBRATION
        c.methods = ("kd", "cka")
    elif experiment == "strong_domain":
        c.tasks.class_lists = (CIFAR10_VEHICLES, CIFAR10_ANIMALS)
        c.methods = STRONG_CORE
    elif experiment == "strong_union":
        fmnist = fashion_mnist_source()
        fmnist.image_size = 32
        c.union = (fmnist,)
        c.methods = STRONG_CORE
        # 110,000 training images: the same number of student images per epoch as CIFAR-10's.
        c.student_data_fraction = scale["student_fraction"] * 50_000 / 110_000
    return c


def get_config(arg="base"):
    experiment, _, dataset = arg.partition(",")
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown study experiment {experiment!r}; valid: {EXPERIMENTS}")
    if experiment in NATURAL_EXPERIMENTS:
        return natural_experiment(experiment)
    if experiment in STRONG_EXPERIMENTS:
        return strong_experiment(experiment)
    if dataset:
        c = importlib.import_module(f"configs.{dataset}").get_config()
    else:
        c = mnist_study_config()
    c.name = f"study: {experiment}" + (f" on {dataset}" if dataset else " (embedded MNIST)")
    c.methods = TABLE2_METHODS
    if experiment == "base":
        return c
    if experiment == "okd":
        # Labelled training on 50 digits per class, where learning from peers has room to
        # help (4,000 digits give the network trained alone 95%), scored on 400 test digits
        # per class (0.025 points per digit); 40 epochs of 7 steps, evaluated every 10.
        # The two teachers (all 250 digits of their task) serve only mcl_okd_kd.
        c.data.train_per_class = 50
        c.data.test_per_class = 400
        c.epochs = 40
        c.eval_every = 10
        c.teacher_data_fraction = 1.0
        c.teacher_epochs = 40
        c.variants = OKD_BRANCH_VARIANTS
        c.methods = OKD_METHODS + tuple(OKD_BRANCH_VARIANTS)
        return c
    c.teacher_data_fraction = 0.1
    if experiment == "hard":
        c.variants = ABLATIONS
        c.methods = TABLE2_METHODS + tuple(ABLATIONS)
    elif experiment == "hetero":
        archs = ("resnet18", "resnet34") if dataset else ("resnet10", "resnet18")
        c.teachers = tuple({"arch": a} for a in archs)
        c.variants = student_sizes(c.student.width)
        c.methods = ("kd", "cka", *c.variants)
    else:
        c.tasks.num_tasks = int(experiment[-1])
        c.methods = ("kd", "cka")
    return c
