"""The one train step every method (and teacher training) uses: its mathematics.

`train_step(state, teacher_variables, batch) -> (state, metrics)`:
1. augments the uint8 batch on the device (per-sample keys from the step and each sample's
   dataset index, so the views do not depend on how the batch is split over devices);
2. runs the frozen teachers in eval mode on view 1 (no gradient);
3. runs the student in train mode on view 1 (and view 2 when the method contrasts views);
4. runs the method's heads, gathers every output to the global batch, and sums the method's
   weighted loss terms (`cka_jax.methods`, `cka_jax.methods.terms`);
5. applies one optimiser update to the student and heads, and (MCL-OKD) the momentum update
   of the memory bank's rows of this batch.

With `PeerNetworks` as the student (MCL-OKD and its baselines) the peers all see view 1; the
terms get every peer's logits and embeddings, the leader's logits as 'logits', and the memory
bank with negatives drawn from the step's key (the same draw on every device).

The device runtime (one device, a device mesh, or pmap; placing state and batches) is
`cka_jax.train.runtime`; with ``axis_name`` set (pmap) the step gathers every output to the
global batch before the batch-wide losses and averages the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cka_jax.methods import Method, diagnostics, losses, okd
from cka_jax.methods.terms import inter_features, loss_terms, total_loss, transport_kwargs
from cka_jax.models import AmalgamationHeads, feature_channels
from cka_jax.train.students import student_kind

NEGATIVES_STREAM = 3  # folded into the step key for MCL-OKD's negatives (views use 1, 2)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'student': ..., 'heads': ...}
    batch_stats: Any  # the student's BatchNorm running statistics
    opt_state: Any
    rng: jax.Array  # uint32 PRNGKey data: the base of every augmentation key
    memory: Any  # MCL-OKD's memory bank (M, N, d) of unit embeddings; {} for other methods


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static the step is built from."""

    student: Any  # a ResNet, or PeerNetworks (see `kind`)
    teachers: tuple[Any, ...]  # ResNets
    heads: AmalgamationHeads | None
    method: Method
    loss_cfg: ml_collections.FrozenConfigDict
    augment: Callable  # (per-sample keys (B,), uint8 images) -> float views
    view_shape: tuple[int, int, int]  # (H, W, C) of one augmented view
    tx: optax.GradientTransformation
    num_data: int = 0  # training-set size: the rows of MCL-OKD's memory bank
    learning_rate: Callable | None = None  # step -> the rate of that update (for the logs)
    # (teacher logits, pooled teacher features) -> calibrated union scores per teacher
    # (`cka_jax.stages.calibrate.Calibrator`); None distils from the raw logits.
    calibration: Callable | None = None

    @property
    def kind(self):
        """The student kind (`cka_jax.train.students`) of the method."""
        return student_kind(self.method)


@functools.cache  # equal settings -> the same object, so equal StepSpecs hash equal
def learning_rate_schedule(learning_rate: float, total_steps: int):
    """Cosine decay from ``learning_rate`` to 0 over ``total_steps`` updates."""
    return optax.cosine_decay_schedule(learning_rate, max(int(total_steps), 1))


@functools.cache  # equal settings -> the same object, so equal StepSpecs hash equal
def make_optimizer(learning_rate: float, weight_decay: float, total_steps: int):
    """Adam with cosine decay; weight decay added to the gradient (torch.optim.Adam's L2)."""
    schedule = learning_rate_schedule(learning_rate, total_steps)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(schedule),
    )


def build_heads(method: Method, teachers: tuple, dtype=jnp.float32) -> AmalgamationHeads | None:
    """The trainable heads the method's terms need (None when they need none)."""
    if method.common_space is None and not method.projection:
        return None
    return AmalgamationHeads(
        teacher_channels=tuple(feature_channels(t) for t in teachers),
        common_space=method.common_space,
        projection=method.projection,
        reconstruction=method.reconstruction,
        adapted_maps=method.adapted_maps,
        dtype=dtype,
    )


def create_train_state(spec: StepSpec, student_variables, teacher_variables, rng):
    """Initialises the heads (if any) and the optimiser around given student variables."""
    params = {"student": student_variables["params"], "heads": {}}
    if spec.heads is not None:
        heads_rng = jax.random.fold_in(rng, 1)
        params["heads"] = _heads_init(spec)(heads_rng, student_variables, teacher_variables)
    memory = {}
    if spec.method.memory_bank:
        if spec.num_data < 1:
            raise ValueError(
                f"method {spec.method.name!r} needs StepSpec.num_data (its memory bank)"
            )
        memory = spec.kind.init_memory(spec.student, spec.num_data, jax.random.fold_in(rng, 3))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_variables.get("batch_stats", {}),
        opt_state=_jitted(spec.tx.init)(params),
        rng=jnp.asarray(jax.random.key_data(jax.random.fold_in(rng, 2)), jnp.uint32),
        memory=memory,
    )


@functools.cache
def _heads_init(spec: StepSpec):
    """Jitted initialisation of the heads on features of a dummy batch (cached per spec)."""

    @jax.jit
    def init_heads(rng, student_variables, teacher_variables):
        x = jnp.zeros((2, *spec.view_shape), jnp.float32)
        _, s_feat = spec.student.apply(student_variables, x)
        t_feats = [t.apply(v, x)[1] for t, v in zip(spec.teachers, teacher_variables, strict=True)]
        return spec.heads.init(rng, s_feat, t_feats, s_feat)["params"]

    return init_heads


@functools.cache
def _jitted(fn):
    return jax.jit(fn)


def sample_keys(state_rng, step, index, view: int):
    """Per-sample PRNG keys from (run key, step, dataset index, view)."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state_rng), step), view)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def _forward(params, state, teacher_variables, batch, spec: StepSpec, axis_name):
    """Every output the method's terms read (global batch), and the student's new BatchNorm
    statistics."""
    method = spec.method
    view1 = spec.augment(sample_keys(state.rng, state.step, batch["index"], 1), batch["image"])
    if method.two_views:
        view2 = spec.augment(sample_keys(state.rng, state.step, batch["index"], 2), batch["image"])
        x = jnp.concatenate([view1, view2])
    else:
        x = view1
    (logits, features), updates = spec.student.apply(
        {"params": params["student"], "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    b = view1.shape[0]
    outputs = spec.kind.outputs(logits, features, batch, b)
    if method.uses_teachers:
        teacher_out = [
            jax.lax.stop_gradient(t.apply(v, view1, train=False))
            for t, v in zip(spec.teachers, teacher_variables, strict=True)
        ]
        outputs["teacher_logits"] = [o[0] for o in teacher_out]
        outputs["teacher_features"] = [o[1] for o in teacher_out]
        if spec.calibration is not None:  # per image, so before the batch is gathered
            pooled = [o[1].mean(axis=(1, 2)) for o in teacher_out]
            outputs["teacher_logits"] = spec.calibration(outputs["teacher_logits"], pooled)
    if spec.heads is not None:
        outputs.update(
            spec.heads.apply(
                {"params": params["heads"]},
                features[:b],
                outputs["teacher_features"],
                features[b:] if method.two_views else None,
            )
        )
    if axis_name is not None:
        # Batch-wide losses must see the global batch, as on one device.
        axis_of = spec.kind.batch_axis
        outputs = {k: _gather_batch(v, axis_name, axis_of(k)) for k, v in outputs.items()}
    if method.memory_bank:
        outputs["memory"] = state.memory
        outputs["negative_index"] = negatives(state, outputs["index"].shape[0], spec)
    return outputs, updates["batch_stats"]


def loss_fn(params, state, teacher_variables, batch, spec: StepSpec, axis_name=None):
    """``(total loss, (terms, new BatchNorm statistics, memory-bank rows))`` of the step at
    ``state`` for ``params`` (what the step differentiates)."""
    method = spec.method
    outputs, batch_stats = _forward(params, state, teacher_variables, batch, spec, axis_name)
    total, terms = total_loss(method, outputs, spec.loss_cfg)
    bank_rows = (outputs["index"], outputs["embeddings"]) if method.memory_bank else None
    return total, (terms, batch_stats, bank_rows)


def term_gradients(state: TrainState, teacher_variables, batch, spec: StepSpec, axis_name=None):
    """``({term: w_k * d term_k / d theta}, outputs)``: each weighted term's gradient on the
    student network's parameters theta (not the heads), at the step's own state and batch.
    They sum to the step's gradient on theta. One forward, then one backward per term (K
    pullbacks of one-hot cotangents; ~1.5x faster on CPU than `jax.jacrev`'s vmapped one)."""
    method = spec.method
    names = tuple(method.weights)

    def weighted_terms(student_params):
        params = {**state.params, "student": student_params}
        outputs, _ = _forward(params, state, teacher_variables, batch, spec, axis_name)
        terms = loss_terms(method, outputs, spec.loss_cfg)
        return jnp.stack([method.weights[n] * terms[n] for n in names]), outputs

    _, pullback, outputs = jax.vjp(weighted_terms, state.params["student"], has_aux=True)
    one_hot = jnp.eye(len(names), dtype=jnp.float32)
    grads = {n: pullback(one_hot[k])[0] for k, n in enumerate(names)}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)  # as the step's gradient
    return grads, outputs


def diagnose(state: TrainState, teacher_variables, batch, *, spec: StepSpec, axis_name=None):
    """What the step at ``state`` would do, term by term (no update):

    * ``grad/<term>``: the norm of the term's weighted gradient on the student network
      (`term_gradients`), and ``grad_share/<term>`` its share of the sum of those norms;
    * with CKA's inter term, ``inter/<model>_peak`` and ``inter/<model>_entropy`` of the
      student's and each teacher's transport map (`diagnostics.transport_peakedness`).
    """
    grads, outputs = term_gradients(state, teacher_variables, batch, spec, axis_name)
    norms = {n: diagnostics.tree_norm(g) for n, g in grads.items()}
    result = {f"grad/{n}": v for n, v in norms.items()}
    result.update({f"grad_share/{n}": v for n, v in diagnostics.gradient_shares(norms).items()})
    if "inter" in spec.method.weights:
        student, teachers = inter_features(outputs, spec.loss_cfg)
        kwargs = transport_kwargs(spec.loss_cfg)
        maps = {"student": student, **{f"teacher{t}": f for t, f in enumerate(teachers)}}
        for model, feats in maps.items():
            stats = diagnostics.transport_peakedness(losses.transport_map(feats, **kwargs))
            result.update({f"inter/{model}_{k}": v for k, v in stats.items()})
    return result


def _gather_batch(value, axis_name: str, axis: int):
    """The global batch of one output (a pytree of arrays) from every device's share."""
    return jax.tree.map(lambda a: jax.lax.all_gather(a, axis_name, axis=axis, tiled=True), value)


def negatives(state: TrainState, batch_size: int, spec: StepSpec):
    """MCL-OKD's negatives for every ordered view pair, from the step's own key: (M, M, S)
    shared by the batch, or (M, M, B, S). S = ``loss.nce_negatives`` capped by N."""
    cfg, m = spec.loss_cfg, spec.student.num_peers
    s = min(int(cfg.nce_negatives), spec.num_data)
    shape = (m, m, s) if cfg.nce_shared_negatives else (m, m, batch_size, s)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return okd.sample_negatives(
        jax.random.fold_in(step_key, NEGATIVES_STREAM), shape, spec.num_data
    )


def train_step(state: TrainState, teacher_variables, batch, *, spec: StepSpec, axis_name=None):
    """One optimiser update of the student and heads (and MCL-OKD's memory bank); returns
    ``(new state, metrics)`` with the loss, every term and the gradient norm."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (terms, batch_stats, bank_rows)), grads = grad_fn(
        state.params, state, teacher_variables, batch, spec, axis_name
    )
    if axis_name is not None:
        # Every device computed the same global loss; pmean recovers its gradient.
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    memory = state.memory
    if bank_rows is not None:
        # From the global batch's rows (gathered under pmap), so every device's bank agrees.
        index, embeddings = bank_rows
        memory = okd.update_memory_bank(
            memory, index, embeddings, momentum=spec.loss_cfg.memory_momentum
        )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        memory=memory,
    )
    return new_state, metrics
