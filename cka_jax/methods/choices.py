"""The named choices of the config and the loss functions, in one place that imports
nothing (reading or validating a config does not load JAX)."""

DISTANCE_KINDS = ("euclidean", "cosine", "mmd")  # d of CKA Eqs. 4-5 (Table 3)
DISTANCE_SCALES = ("l2", "none", "mean")  # `normalize` of Eq. 5
REDUCTIONS = ("mean", "sum")  # over the negatives of Eqs. 3 and 6
KL_DIRECTIONS = ("teacher_student", "student_teacher")  # Eq. 11
INTER_FEATURES = ("backbone", "adapted")  # what Eqs. 5-6 compare
PARALLELISM = ("mesh", "pmap", "single")
COMPUTE_DTYPES = ("float32", "bfloat16")
SELECTION_CRITERIA = ("final", "teacher_agreement")
STEMS = ("imagenet", "small")
# `config.teacher_calibration` (cka_jax.methods.calibration registers each under this name).
CALIBRATION_KINDS = (
    "none",
    "softmax",
    "mean_subtracted",
    "standardize",
    "prior_em",
    "balanced_classes",
    "energy_em",
    "cluster_vote",
)
