"""Evaluation metrics and schedules for Genie as pure, batched torch functions.
PSNR, SSIM, sharpness, ΔtPSNR (controllability), NMI of latent vs. true actions, MaskGIT schedule, codebook perplexity.

Images are channels-last ``[..., H, W, C]``: float in [0, 1], or uint8 in [0, 255] (divided by 255).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

# Cap for the mean squared error's floor: identical images give PSNR = 10·log10(max²/1e-10),
# i.e. 100 dB for max_value = 1, instead of +inf, so averages over a batch stay finite.
MSE_FLOOR = 1e-10

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [0, 1]; floating input is promoted to at least float32, unscaled."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.to(torch.promote_types(images.dtype, torch.float32))


def psnr(a: torch.Tensor, b: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, over the last three dims ``[H, W, C]``.

    PSNR = 10 · log10(max_value² / MSE), MSE = mean((a − b)²) clamped below at ``MSE_FLOOR``
    (so identical images give 100 dB for max_value 1). Returns shape ``a.shape[:-3]``.
    """
    _check_same_image_shape(a, b)
    a, b = to_unit_float(a), to_unit_float(b)
    mse = (a - b).square().mean(dim=(-3, -2, -1)).clamp_min(MSE_FLOOR)
    return 10.0 * torch.log10(max_value**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), channels averaged; shape ``a.shape[:-3]``.

    With Gaussian-weighted local statistics (11×11 window, σ = 1.5, 'valid' positions only, as in
    ``tf.image.ssim``), C1 = (0.01·L)², C2 = (0.03·L)², L = 1:
        SSIM = mean over positions of (2μaμb + C1)(2σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2)).
    Images must be at least 11×11.
    """
    _check_same_image_shape(a, b)
    height, width = a.shape[-3], a.shape[-2]
    if height < SSIM_WINDOW_SIZE or width < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE}, got {height}x{width}"
        )
    batch_shape, channels = a.shape[:-3], a.shape[-1]
    a, b = to_unit_float(a), to_unit_float(b)
    # Each (image, channel) pair is filtered independently: fold channels into the batch.
    a = rearrange(a.reshape(-1, *a.shape[-3:]), "n h w c -> (n c) 1 h w")
    b = rearrange(b.reshape(-1, *b.shape[-3:]), "n h w c -> (n c) 1 h w")
    # Centring each channel first keeps E[x²] − E[x]² from cancelling catastrophically in float32;
    # (co)variances are shift-invariant, and the shift is added back for the luminance means.
    shift_a, shift_b = a.mean(dim=(-2, -1), keepdim=True), b.mean(dim=(-2, -1), keepdim=True)
    a, b = a - shift_a, b - shift_b
    blur = _gaussian_blur_valid
    centred_mean_a, centred_mean_b = blur(a), blur(b)
    variance_a = blur(a * a) - centred_mean_a.square()
    variance_b = blur(b * b) - centred_mean_b.square()
    covariance = blur(a * b) - centred_mean_a * centred_mean_b
    mean_a, mean_b = centred_mean_a + shift_a, centred_mean_b + shift_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
        (mean_a.square() + mean_b.square() + c1) * (variance_a + variance_b + c2)
    )  # [(n c), 1, H - 10, W - 10]
    per_channel = rearrange(ssim_map.mean(dim=(-2, -1)), "(n c) 1 -> n c", c=channels)
    return per_channel.mean(dim=-1).reshape(batch_shape)


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute 4-neighbour Laplacian per image (channels averaged, interior pixels), shape
    ``images.shape[:-3]``: the energy of fine detail. A world that washes into blur loses it while its
    PSNR against a blurry average can still look fine; compare against real frames' value."""
    x = to_unit_float(images)
    centre = x[..., 1:-1, 1:-1, :]
    laplacian = (4 * centre - x[..., :-2, 1:-1, :] - x[..., 2:, 1:-1, :] - x[..., 1:-1, :-2, :] - x[..., 1:-1, 2:, :])
    return laplacian.abs().mean(dim=(-3, -2, -1))


def vertical_repeat_rate(tokens: torch.Tensor) -> torch.Tensor:
    """Share of token positions equal to the token directly above, per frame: tokens [..., h, w] -> [...].
    A scene smeared into vertical streaks drives it towards 1 (real CoinRun clips: ~0.3)."""
    return (tokens[..., 1:, :] == tokens[..., :-1, :]).float().mean(dim=(-2, -1))


def delta_t_psnr(
    frames_true: torch.Tensor,
    frames_from_inferred_actions: torch.Tensor,
    frames_from_random_actions: torch.Tensor,
) -> float:
    """Controllability metric of the Genie paper (Sec. 3.1), for frames at one time step t.

    ΔtPSNR = PSNR(x_t, x̂_t) − PSNR(x_t, x̂'_t), where x̂_t is generated from latent actions inferred
    from the ground truth and x̂'_t from random latent actions; PSNRs are averaged over all leading
    dims (the batch). Larger means the actions change the generated frame more.
    """
    inferred = psnr(frames_true, frames_from_inferred_actions).mean()
    random = psnr(frames_true, frames_from_random_actions).mean()
    return float(inferred - random)


def contingency(latent: torch.Tensor, true: torch.Tensor, num_latent: int, num_true: int) -> torch.Tensor:
    """Count table ``[num_latent, num_true]``: entry (i, j) = #samples with latent i and true action j."""
    latent, true = latent.reshape(-1).long(), true.reshape(-1).long()
    if latent.shape != true.shape:
        raise ValueError(f"label tensors differ in size: {latent.numel()} vs {true.numel()}")
    _check_label_range(latent, num_latent, "latent")
    _check_label_range(true, num_true, "true")
    flat = torch.bincount(latent * num_true + true, minlength=num_latent * num_true)
    return flat.reshape(num_latent, num_true)


def mutual_information_from_contingency(table: torch.Tensor) -> tuple[float, float, float]:
    """(I(A;B), H(A), H(B)) in nats from a count table, with 0·log 0 = 0."""
    joint = table.to(torch.float64)
    total = joint.sum()
    if total <= 0:
        raise ValueError("contingency table is empty")
    joint = joint / total
    marginal_a, marginal_b = joint.sum(dim=1), joint.sum(dim=0)
    outer = marginal_a[:, None] * marginal_b[None, :]
    nonzero = joint > 0
    mutual_information = (joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum()
    return float(mutual_information.clamp_min(0.0)), _entropy(marginal_a), _entropy(marginal_b)


def normalized_mutual_information(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """NMI with arithmetic-mean normalisation (sklearn's ``normalized_mutual_info_score`` default).

    NMI = I(A;B) / ((H(A) + H(B)) / 2). Invariant to relabelling; 1 for identical partitions,
    ≈ 0 for independent ones. Two single-cluster labelings count as identical (1.0), as in sklearn.
    """
    if labels_a.numel() == 0:
        raise ValueError("normalized_mutual_information needs at least one label")
    _, index_a = torch.unique(labels_a.reshape(-1), return_inverse=True)
    _, index_b = torch.unique(labels_b.reshape(-1), return_inverse=True)
    num_a, num_b = int(index_a.max()) + 1, int(index_b.max()) + 1
    if num_a == num_b == 1:
        return 1.0
    table = contingency(index_a, index_b, num_a, num_b)
    mutual_information, entropy_a, entropy_b = mutual_information_from_contingency(table)
    normaliser = max((entropy_a + entropy_b) / 2.0, torch.finfo(torch.float64).eps)
    return min(1.0, mutual_information / normaliser)


def action_purity(table: torch.Tensor) -> float:
    """Fraction of samples whose true action is the most common true action of their latent action.

    1.0 means every latent action maps to a single true action (though several may share one).
    """
    total = table.sum()
    if total <= 0:
        raise ValueError("contingency table is empty")
    return float(table.max(dim=1).values.sum() / total)


def maskgit_mask_schedule(step: int, total_steps: int) -> float:
    """MaskGIT cosine schedule: fraction of tokens still masked after ``step`` of ``total_steps``.

    γ(r) = cos(π/2 · r), r = step / total_steps: 1.0 at step 0, 0.0 after the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, {total_steps}], got {step}")
    if step == total_steps:
        return 0.0  # cos(π/2) is 6e-17 in floating point; the last step unmasks everything.
    return math.cos(math.pi / 2 * step / total_steps)


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of code usage: 1 when one code is used, K when K codes are used uniformly.

    ``counts`` holds non-negative usage counts (or EMA usage) per codebook entry.
    """
    counts = counts.reshape(-1).to(torch.float64)
    if (counts < 0).any():
        raise ValueError("codebook counts must be non-negative")
    total = counts.sum()
    if total <= 0:
        raise ValueError("codebook counts are all zero: no code was used")
    return math.exp(_entropy(counts / total))


def _entropy(probabilities: torch.Tensor) -> float:
    nonzero = probabilities[probabilities > 0]
    return float(-(nonzero * nonzero.log()).sum())


def _gaussian_blur_valid(images: torch.Tensor) -> torch.Tensor:
    """Separable normalised Gaussian filter, 'valid' output; images ``[N, 1, H, W]``."""
    positions = torch.arange(SSIM_WINDOW_SIZE, dtype=images.dtype, device=images.device)
    offsets = positions - (SSIM_WINDOW_SIZE - 1) / 2
    kernel = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    images = F.conv2d(images, kernel.reshape(1, 1, -1, 1))
    return F.conv2d(images, kernel.reshape(1, 1, 1, -1))


def _check_same_image_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 3:
        raise ValueError(f"images must be [..., H, W, C], got shape {tuple(a.shape)}")


def _check_label_range(labels: torch.Tensor, num_labels: int, name: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"{name} labels must lie in [0, {num_labels}), got [{low}, {high}]")
