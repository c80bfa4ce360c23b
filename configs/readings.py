"""The readings of the CKA paper's ambiguous equations, side by side (docs/method.md).

    python -m cka_jax.main --config=configs/readings.py:default --workdir=runs/readings/default
    python scripts/readings_report.py runs/readings/default

Arguments (``<setting>`` or ``<setting>,<group>``):
  setting  'default' (configs/default.py) or 'hard' (the study's `hard` experiment).
  group    which variants to train: 'inter' (Eq. 5's scale and temperature, Eq. 6's
           reduction, the features fed to Eqs. 5-6), 'candidates' (the same without the
           summed negatives), 'terms' (Eq. 3's reduction, Eq. 11's KL direction, the
           reconstruction guard, on top of the method's defaults), or 'all' (default).

Every variant is `cka` with loss fields changed; all share the setting's teachers, so their
differences are the readings'. `kd` runs beside them as the reference.
"""

import importlib

# Eq. 5-6 readings: (distance scale, temperature, reduction over Eq. 6's negatives, features).
INTER_READINGS = {
    "l2_t1": dict(inter_normalize="l2", inter_temperature=1.0),
    "l2_t01": dict(inter_normalize="l2", inter_temperature=0.1),
    "none_t1": dict(inter_normalize="none", inter_temperature=1.0),
    "none_t1_sum": dict(inter_normalize="none", inter_temperature=1.0, inter_reduction="sum"),
    "mean_t1": dict(inter_normalize="mean", inter_temperature=1.0),
    "mean_t02": dict(inter_normalize="mean", inter_temperature=0.2),
    "mean_t01": dict(inter_normalize="mean", inter_temperature=0.1),
    "mean_t01_sum": dict(inter_normalize="mean", inter_temperature=0.1, inter_reduction="sum"),
    "mean_t01_adapted": dict(
        inter_normalize="mean", inter_temperature=0.1, inter_features="adapted"
    ),
}

# Eq. 3 and Eq. 11 readings and weights, each one change from the method's defaults.
TERM_READINGS = {
    "defaults": dict(),
    "intra_sum": dict(intra_reduction="sum"),
    "std_literal": dict(std_direction="student_teacher"),
    "no_recon": dict(recon_weight=0.0),
}

# The Eq. 5-6 readings worth a closer look once the sum over Eq. 6's negatives is out.
CANDIDATES = {k: v for k, v in INTER_READINGS.items() if v.get("inter_reduction") != "sum"}

GROUPS = {"inter": INTER_READINGS, "candidates": CANDIDATES, "terms": TERM_READINGS}


def get_config(arg="default"):
    setting, _, group = arg.partition(",")
    if setting == "default":
        c = importlib.import_module("configs.default").get_config()
    elif setting == "hard":
        c = importlib.import_module("configs.study").get_config("hard")
    else:
        raise ValueError(f"unknown setting {setting!r}; valid: default, hard")
    group = group or "all"
    if group not in (*GROUPS, "all"):
        raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS)}, all")
    readings = {}
    for name, fields in GROUPS.items():
        if group == name or (group == "all" and name != "candidates"):
            prefix = "inter" if name == "candidates" else name
            readings.update({f"cka_{prefix}_{k}": v for k, v in fields.items()})
    c.name = f"CKA readings ({group}) on {setting}"
    c.variants = {name: dict(method="cka", loss=loss) for name, loss in readings.items()}
    c.methods = ("kd", *c.variants)
    c.log_every = 20
    return c
