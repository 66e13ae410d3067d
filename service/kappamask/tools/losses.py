"""Training loss and metrics of the paper: generalised dice, UNDEFINED excluded."""

from __future__ import annotations

import torch

from kappamask.bands import NETWORK_OUTPUT_ORDER, MaskClass

#: The classes the served graph decides between (mask codes).
REAL_CLASSES = (
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
)

#: Network channel of each mask code (UNDEFINED has a channel but is never a target).
CHANNEL_OF_CODE = {int(code): ch for ch, code in enumerate(NETWORK_OUTPUT_ORDER)}


def one_hot_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [N, H, W] of mask codes -> one-hot [N, 6, H, W] and weight mask [N, 1, H, W]."""
    lut = torch.tensor([CHANNEL_OF_CODE[c] for c in range(len(NETWORK_OUTPUT_ORDER))])
    channels = lut.to(labels.device)[labels.long()]
    onehot = torch.nn.functional.one_hot(channels, len(NETWORK_OUTPUT_ORDER))
    onehot = onehot.permute(0, 3, 1, 2).float()
    keep = (labels != MaskClass.UNDEFINED).unsqueeze(1).float()
    return onehot, keep


def generalised_dice_loss(
    probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Generalised dice loss (Sudre et al. 2017) over clear, shadow, semi-transparent and
    cloud.

    Pixels labelled UNDEFINED or MISSING do not count: the served graph decides MISSING
    from the input (no data), and with weights 1 / (class volume)^2 a few no-data pixels
    in a crop would outweigh everything else. (``masked_bce`` still trains the MISSING
    output.)
    """
    onehot, keep = one_hot_targets(labels)
    keep = keep * (labels != MaskClass.MISSING).unsqueeze(1).float()
    skipped = {CHANNEL_OF_CODE[int(MaskClass.UNDEFINED)], CHANNEL_OF_CODE[int(MaskClass.MISSING)]}
    real = [c for c in range(onehot.shape[1]) if c not in skipped]
    p = probs[:, real] * keep
    t = onehot[:, real] * keep
    volume = t.sum(dim=(0, 2, 3))
    weight = 1.0 / (volume * volume + eps)
    # Classes absent from the batch would get a huge weight and contribute only noise.
    weight = torch.where(volume > 0, weight, torch.zeros_like(weight))
    intersection = (weight * (p * t).sum(dim=(0, 2, 3))).sum()
    union = (weight * (p + t).sum(dim=(0, 2, 3))).sum()
    return 1.0 - 2.0 * intersection / (union + eps)


def masked_bce(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of the sigmoid outputs against one-hot labels, UNDEFINED excluded."""
    onehot, keep = one_hot_targets(labels)
    p = probs.clamp(eps, 1 - eps)
    bce = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))
    return (bce * keep).sum() / (keep.sum() * probs.shape[1] + eps)


def balanced_cross_entropy(
    probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Cross-entropy of the decision the served graph makes (the best of CLEAR .. CLOUD),
    each class weighted by the inverse square root of its share of the batch's labelled
    pixels (shares below 1 % count as 1 %), UNDEFINED and MISSING excluded.

    The generalised dice loss weights a class by 1 / volume squared, so the rarest class
    of a batch decides it alone: 177 semi-transparent pixels next to 88 000 cloud pixels
    (a real distillation batch) gave a loss that a single batch could not be overfitted
    on in 40 steps. This loss learns every class from the first steps."""
    onehot, keep = one_hot_targets(labels)
    keep = keep * (labels != MaskClass.MISSING).unsqueeze(1).float()
    real = [CHANNEL_OF_CODE[int(c)] for c in REAL_CLASSES]
    p = probs[:, real].clamp_min(eps)
    log_q = torch.log(p / p.sum(dim=1, keepdim=True))
    t = onehot[:, real] * keep
    counts = t.sum(dim=(0, 2, 3))
    share = (counts / counts.sum().clamp_min(1.0)).clamp_min(0.01)
    weight = torch.where(counts > 0, share.rsqrt(), torch.zeros_like(share))
    per_pixel = -(t * log_q * weight[None, :, None, None]).sum(dim=1)
    norm = (t * weight[None, :, None, None]).sum().clamp_min(1.0)
    return per_pixel.sum() / norm


LOSSES = {
    "gdl": generalised_dice_loss,
    # The dice term alone starts slowly from random weights; BCE gives every pixel a
    # gradient from the first step. Used for the short bootstrap runs.
    "gdl+bce": lambda probs, labels: (
        generalised_dice_loss(probs, labels) + masked_bce(probs, labels)
    ),
    # Distillation: every class from the first steps, and calibrated sigmoid outputs.
    "ce+bce": lambda probs, labels: (
        balanced_cross_entropy(probs, labels) + masked_bce(probs, labels)
    ),
}
