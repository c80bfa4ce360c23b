"""PyTorch reference of the amalgamation train step, for speed comparisons with the JAX step.

    python scripts/torch_reference.py [--method cfl] [--batch_size 8] [--image_size 32]
        [--teacher_archs resnet18 resnet18] [--student_arch resnet18] [--repeats 5]

prints one JSON object (median step time, images/s, threads, torch version).

It is written as a PyTorch user would write it (torchvision ResNets, channels_last, Adam,
no host synchronisation inside the step) and mirrors ``cka_jax.train.step`` for the methods
'kd' and 'cfl':

* the frozen teachers run in eval mode under ``torch.no_grad()`` on the same (already
  augmented and normalised) images as the student, which runs in train mode (its BatchNorm
  statistics update);
* 'kd' = ``soft_target_kl(student logits, concatenated teacher logits)`` (CKA Eq. 11);
* 'cfl' = kd + cfl_weight * (sum_t MMD(student common, teacher_t common) (CFL Eq. 2)
  + sum_t MSE(decoder_t(teacher_t common), teacher_t feature map) (CFL Eq. 4)), with the
  heads of ``cka_jax.models.AmalgamationHeads(common_space='cfl', reconstruction=True)``;
* one ``torch.optim.Adam`` update of the student and heads with L2 weight decay added to
  the gradient (as the JAX optimiser does).

Differences that do not change the cost of a step: the JAX step augments uint8 images on the
device and follows a cosine learning-rate schedule; here the images come in augmented and
the learning rate is constant. Parameters use PyTorch's default initialisation, not Flax's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = [
    "DEFAULT_SIGMAS",
    "METHODS",
    "ResNetWithFeatures",
    "ResidualBlock",
    "CFLHeads",
    "TorchAmalgamationStep",
    "mmd",
    "soft_target_kl",
    "reconstruction_loss",
    "make_resnet",
    "benchmark",
]

DEFAULT_SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)
METHODS = ("kd", "cfl")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEMS = ("imagenet", "small")


# --------------------------------------------------------------------------- losses


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D) float32; a 4-D (B, C, H, W) map is flattened in (H, W, C) order.

    That is the order of the JAX side's NHWC maps. On a channels_last tensor the permuted
    view is contiguous, so the reshape is free (flattening NCHW order would copy).
    """
    if x.ndim < 2:
        raise ValueError(f"expected a batch-first tensor with ndim >= 2, got shape {x.shape}")
    if x.ndim == 4:
        x = x.permute(0, 2, 3, 1)
    return x.float().reshape(x.shape[0], -1)


def mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Biased multi-kernel MMD^2 between two sets of samples (CFL Eq. 2; CKA Eqs. 7-9).

        K(a, b) = (1/m) sum_{u=1}^m exp(-||a - b||^2 / (2 sigma_u^2))   (equal weights)
        MMD^2 = mean_{i,j} K(x_i, x_j) + mean_{i,j} K(y_i, y_j) - 2 mean_{i,j} K(x_i, y_j)

    clamped at 0, on rows flattened as in `_rows` and, when ``normalize``, L2-normalised.
    As ``cka_jax.methods.losses.mmd``, squared distances come from explicit differences (cdist
    without the matmul shortcut): identical rows are exactly 0 apart, so the sigma=0.001
    kernel (2 sigma^2 = 2e-6) does not amplify ``|a|^2 + |b|^2 - 2ab`` rounding, and the
    gradient there is 0 rather than nan.
    """
    x, y = _rows(x), _rows(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y rows differ in size: {x.shape[1]} vs {y.shape[1]}")
    if len(sigmas) == 0:
        raise ValueError("sigmas must not be empty")
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    n, z = x.shape[0], torch.cat([x, y])
    sq_dists = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
    # Python-float gammas: a tensor of them would be a host-to-device copy every step.
    kernel = sum(torch.exp(sq_dists * (-1.0 / (2.0 * float(s) ** 2))) for s in sigmas)
    kernel = kernel / len(sigmas)
    kxx, kyy, kxy = kernel[:n, :n].mean(), kernel[n:, n:].mean(), kernel[:n, n:].mean()
    return torch.clamp(kxx + kyy - 2.0 * kxy, min=0.0)


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    r"""Soft-target distillation loss (CKA Eq. 11; Hinton et al.'s KD).

        T^2 * mean_batch KL( softmax(teacher / T) || softmax(student / T) )

    ``teacher_logits`` is the concatenation of all teachers' logits, (B, C) like the student's.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # 'batchmean' = sum over classes, mean over the batch: the KL per sample, averaged.
    return temperature**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def reconstruction_loss(reconstructed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Reconstruction term of CFL (Eq. 4): ``mean((F'_T - F_T)^2)`` over all elements.

    The paper writes ``||F'_T - F_T||_2``; the CFL authors' code (and the JAX side) use the
    mean squared error.
    """
    if reconstructed.shape != target.shape:
        raise ValueError(
            f"reconstruction and target differ in shape: "
            f"{tuple(reconstructed.shape)} vs {tuple(target.shape)}"
        )
    return F.mse_loss(reconstructed.float(), target.float())


# --------------------------------------------------------------------------- models


class ResNetWithFeatures(nn.Module):
    """A torchvision ResNet whose forward returns ``(logits, layer4 feature map)``.

    The feature map is the last stage's output before pooling, (B, C, h, w), as the JAX
    ResNet's ``features`` (there NHWC).
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.resnet = resnet
        self.feature_channels = resnet.fc.in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        features = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        logits = r.fc(torch.flatten(r.avgpool(features), 1))
        return logits, features


def make_resnet(arch: str, num_classes: int, stem: str = "imagenet") -> ResNetWithFeatures:
    """A randomly initialised ResNet (no download) returning ``(logits, features)``.

    ``arch``: a torchvision ResNet name, or 'resnet10' (BasicBlock, one block per stage: the
    JAX side's small variant, not in torchvision). ``stem``: 'imagenet' (torchvision's 7x7/2
    conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, no max-pool), as ``cka_jax.models``.
    """
    if arch == "resnet10":
        resnet = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    elif arch in TORCHVISION_RESNETS:
        resnet = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        choices = ", ".join(("resnet10", *TORCHVISION_RESNETS))
        raise ValueError(f"unknown architecture {arch!r}; choose one of {choices}")
    if stem == "small":
        resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}: use one of {STEMS}")
    return ResNetWithFeatures(resnet)


class ResidualBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs (stride 1) plus a shortcut, projected by a 1x1 conv when the
    channel count changes; ReLU after the sum (``cka_jax.models.ResidualBlock``)."""

    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, features, 1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.conv3 = nn.Conv2d(features, features, 1)
        self.shortcut = (
            nn.Conv2d(in_channels, features, 1) if in_channels != features else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs are safe: conv and add backward do not need their outputs.
        y = F.relu(self.conv1(x), inplace=True)
        y = F.relu(self.conv2(y), inplace=True)
        return F.relu(self.conv3(y) + self.shortcut(x), inplace=True)


def _adaption(in_channels: int, features: int) -> nn.Sequential:
    """1x1 conv + ReLU to a fixed width, so models of any width meet in one space."""
    return nn.Sequential(nn.Conv2d(in_channels, features, 1), nn.ReLU(inplace=True))


def _decoder(common_dim: int, hidden: int, out_channels: int) -> nn.Sequential:
    """1x1 conv -> ReLU -> 1x1 conv: a common feature map back to a teacher's feature map."""
    return nn.Sequential(
        nn.Conv2d(common_dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1)
    )


class CFLHeads(nn.Module):
    """CFL's trainable heads (Luo et al. 2019, Sec. 4.1), as ``AmalgamationHeads(
    common_space='cfl', reconstruction=True)``: per model a 1x1 conv adaption (+ReLU) to
    ``adapt_dim`` channels, one shared extractor of ``num_blocks`` residual blocks to
    ``common_dim`` channels (kept spatial), and per teacher a decoder back to its feature map.

    ``forward(student_features, teacher_features)`` returns a dict with 'student_common',
    'teacher_common' (list), 'reconstruction' and 'reconstruction_target' (lists, per teacher).
    All convolutions have a bias; there is no BatchNorm.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: Sequence[int],
        adapt_dim: int = 256,
        common_dim: int = 128,
        num_blocks: int = 3,
    ):
        super().__init__()
        self.adapt_student = _adaption(student_channels, adapt_dim)
        self.adapt_teachers = nn.ModuleList(_adaption(c, adapt_dim) for c in teacher_channels)
        widths = [adapt_dim] + [common_dim] * num_blocks
        self.shared_extractor = nn.Sequential(
            *(ResidualBlock(widths[i], widths[i + 1]) for i in range(num_blocks))
        )
        self.decoders = nn.ModuleList(_decoder(common_dim, adapt_dim, c) for c in teacher_channels)

    def forward(
        self, student_features: torch.Tensor, teacher_features: Sequence[torch.Tensor]
    ) -> dict:
        if len(teacher_features) != len(self.adapt_teachers):
            raise ValueError(
                f"got {len(teacher_features)} teacher feature maps for "
                f"{len(self.adapt_teachers)} teachers"
            )
        teacher_common = [
            self.shared_extractor(adapt(f))
            for adapt, f in zip(self.adapt_teachers, teacher_features, strict=True)
        ]
        return {
            "student_common": self.shared_extractor(self.adapt_student(student_features)),
            "teacher_common": teacher_common,
            "reconstruction": [
                decode(c) for decode, c in zip(self.decoders, teacher_common, strict=True)
            ],
            "reconstruction_target": list(teacher_features),
        }


# --------------------------------------------------------------------------- the step


class TorchAmalgamationStep:
    """Frozen teachers, a student over the union of their classes, heads and Adam: one
    ``step(images)`` is one amalgamation update (see the module docstring).

    Attributes: ``student``, ``teachers`` (list), ``heads`` (``CFLHeads`` or None),
    ``optimizer``, ``weights`` (loss weight per term name, as ``cka_jax.methods``),
    ``device``, ``memory_format``.
    """

    def __init__(
        self,
        method: str,
        teacher_archs: Sequence[str],
        student_arch: str,
        classes_per_teacher: int,
        kd_temperature: float = 1.0,
        cfl_weight: float = 10.0,
        lr: float = 5e-4,
        weight_decay: float = 5e-4,
        channels_last: bool = True,
        device: str | torch.device = "cpu",
        stem: str = "imagenet",
        seed: int = 0,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; this reference has {METHODS}")
        if not teacher_archs:
            raise ValueError("need at least one teacher")
        self.method = method
        self.kd_temperature = kd_temperature
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # As build_method: cfl = kd + w * (align + recon); zero-weight terms are dropped.
        weights = {"kd": 1.0}
        if method == "cfl":
            weights.update(align=float(cfl_weight), recon=float(cfl_weight))
        self.weights = {name: w for name, w in weights.items() if w}

        # A private RNG stream: building the models leaves the caller's torch seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.teachers = [make_resnet(a, classes_per_teacher, stem) for a in teacher_archs]
            self.student = make_resnet(student_arch, len(teacher_archs) * classes_per_teacher, stem)
            self.heads = None
            if method == "cfl":
                self.heads = CFLHeads(
                    self.student.feature_channels, [t.feature_channels for t in self.teachers]
                )
        for teacher in self.teachers:
            teacher.to(self.device, memory_format=self.memory_format).eval()
            teacher.requires_grad_(False)
        self.student.to(self.device, memory_format=self.memory_format).train()
        trainable = list(self.student.parameters())
        if self.heads is not None:
            self.heads.to(self.device, memory_format=self.memory_format).train()
            trainable += list(self.heads.parameters())
        # torch's Adam adds weight_decay * param to the gradient (L2), as the JAX optimiser.
        self.optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)

    def loss_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass: ``(weighted total, {term name: value})``, tensors on the device.

        Runs the student in train mode, so its BatchNorm running statistics update.
        """
        with torch.no_grad():
            teacher_out = [teacher(images) for teacher in self.teachers]
        logits, features = self.student(images)
        teacher_logits = torch.cat([out[0] for out in teacher_out], dim=1)
        terms = {"kd": soft_target_kl(logits, teacher_logits, self.kd_temperature)}
        if "align" in self.weights or "recon" in self.weights:
            heads_out = self.heads(features, [out[1] for out in teacher_out])
            student_common = heads_out["student_common"]
            terms["align"] = sum(mmd(student_common, t) for t in heads_out["teacher_common"])
            terms["recon"] = sum(
                reconstruction_loss(r, t)
                for r, t in zip(
                    heads_out["reconstruction"], heads_out["reconstruction_target"], strict=True
                )
            )
        total = sum(self.weights[name] * terms[name] for name in self.weights)
        return total, terms

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """One update on ``images`` (float NCHW on the device, augmented and normalised).

        Returns the loss (before the update) as a device tensor: nothing here waits for the
        device, so steps queue up asynchronously as in a real training loop.
        """
        images = images.contiguous(memory_format=self.memory_format)
        total, _ = self.loss_terms(images)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return total.detach()


# --------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times single steps of ``step_obj`` on one fixed random batch, so that its steps can be
    interleaved with another framework's in one process (both then see the same machine
    state). On CUDA, cuDNN autotuning is on while the timer lives (fixed shapes; the warm-up
    steps tune it); `close` restores it."""

    def __init__(
        self, step_obj: TorchAmalgamationStep, batch_size: int, image_size: int, warmup: int = 3
    ):
        self.step_obj, self.device = step_obj, step_obj.device
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        self.images = images.to(self.device).contiguous(memory_format=step_obj.memory_format)
        self._cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        for _ in range(warmup):
            self.loss = step_obj.step(self.images)
        _synchronize(self.device)

    def time_one(self) -> float:
        """Seconds of one step; the device is synchronised only at its edges."""
        start = time.perf_counter()
        self.loss = self.step_obj.step(self.images)
        _synchronize(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        torch.backends.cudnn.benchmark = self._cudnn_benchmark


def summary(
    step_obj: TorchAmalgamationStep,
    times: Sequence[float],
    batch_size: int,
    image_size: int,
    loss: torch.Tensor,
) -> dict:
    """The result dict of timed steps: 'step_seconds_median', 'images_per_second', ..."""
    median = statistics.median(times)
    return {
        "method": step_obj.method,
        "device": str(step_obj.device),
        "batch_size": batch_size,
        "image_size": image_size,
        "repeats": len(times),
        "channels_last": step_obj.memory_format == torch.channels_last,
        "step_seconds_median": median,
        "step_seconds_min": min(times),
        "images_per_second": batch_size / median,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "final_loss": float(loss),  # after the timing: the one host sync
    }


def benchmark(
    step_obj: TorchAmalgamationStep,
    batch_size: int,
    image_size: int,
    warmup: int = 3,
    repeats: int = 20,
) -> dict:
    """Times ``step_obj.step`` on one random batch: the median of ``repeats`` steps after
    ``warmup`` untimed ones (see `StepTimer`). Returns `summary`'s dict and the warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timer = StepTimer(step_obj, batch_size, image_size, warmup)
    try:
        times = [timer.time_one() for _ in range(repeats)]
    finally:
        timer.close()
    return {**summary(step_obj, times, batch_size, image_size, timer.loss), "warmup": warmup}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="cfl")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--teacher_archs", nargs="+", default=["resnet18", "resnet18"])
    parser.add_argument("--student_arch", default="resnet18")
    parser.add_argument("--classes_per_teacher", type=int, default=5)
    parser.add_argument("--stem", choices=STEMS, default="imagenet")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_channels_last", action="store_true")
    args = parser.parse_args(argv)
    step_obj = TorchAmalgamationStep(
        args.method,
        args.teacher_archs,
        args.student_arch,
        args.classes_per_teacher,
        channels_last=not args.no_channels_last,
        device=args.device,
        stem=args.stem,
    )
    result = benchmark(step_obj, args.batch_size, args.image_size, args.warmup, args.repeats)
    result.update(teacher_archs=args.teacher_archs, student_arch=args.student_arch)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
