"""Tests for the pure metric functions against values computed by hand or by a naive reference.
Covers PSNR, SSIM, sharpness, ΔtPSNR, NMI/contingency, the MaskGIT schedule and codebook perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from genie_models.metrics import (
    action_purity,
    codebook_perplexity,
    contingency,
    delta_t_psnr,
    maskgit_mask_schedule,
    normalized_mutual_information,
    psnr,
    sharpness,
    ssim,
    vertical_repeat_rate,
)


def _random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_of_constant_offset_0_1_is_20_db() -> None:
    a = _random_images(2, 3, 16, 16, 3) * 0.8
    assert torch.allclose(psnr(a, a + 0.1), torch.full((2, 3), 20.0, dtype=torch.float64))


def test_psnr_is_per_image_and_respects_max_value() -> None:
    a = torch.zeros(2, 4, 4, 1)
    b = torch.stack([torch.full((4, 4, 1), 0.1), torch.full((4, 4, 1), 0.01)])
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 40.0]), atol=1e-4)
    assert torch.allclose(psnr(a * 255, b * 255, max_value=255.0), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_psnr_of_identical_images_is_capped_at_100_db() -> None:
    a = _random_images(4, 4, 3)
    assert psnr(a, a).item() == pytest.approx(100.0)


def test_psnr_accepts_uint8_as_0_to_255() -> None:
    a = torch.zeros(8, 8, 3, dtype=torch.uint8)
    b = torch.full((8, 8, 3), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 → 10·log10(1 / 0.04) ≈ 13.98 dB
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)


def test_psnr_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(4, 4, 3), torch.zeros(4, 4, 1))


def test_ssim_of_identical_images_is_one() -> None:
    a = _random_images(3, 32, 32, 3)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_drops_as_noise_grows() -> None:
    a = _random_images(32, 32, 3)
    noise = _random_images(32, 32, 3, seed=1) - 0.5
    scores = [ssim(a, (a + scale * noise).clamp(0, 1)).item() for scale in (0.0, 0.05, 0.2, 0.8)]
    assert scores[0] == pytest.approx(1.0)
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] < 0.9


def test_ssim_of_independent_noise_images_is_near_zero() -> None:
    assert abs(ssim(_random_images(64, 64, 3), _random_images(64, 64, 3, seed=1)).item()) < 0.05


def test_ssim_of_two_constant_images_matches_closed_form() -> None:
    # No variance anywhere, so SSIM = (2·μa·μb + C1) / (μa² + μb² + C1), with C1 = 0.01².
    a, b = torch.full((16, 16, 1), 0.5), torch.full((16, 16, 1), 0.3)
    expected = (2 * 0.5 * 0.3 + 1e-4) / (0.5**2 + 0.3**2 + 1e-4)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)


def _naive_ssim_one_channel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Window-by-window SSIM with an explicit 11×11 Gaussian, to check the convolution version."""
    offsets = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-offsets.square() / (2 * 1.5**2))
    window = torch.outer(gauss, gauss) / torch.outer(gauss, gauss).sum()
    values = []
    for top in range(a.shape[0] - 10):
        for left in range(a.shape[1] - 10):
            pa, pb = a[top : top + 11, left : left + 11], b[top : top + 11, left : left + 11]
            mean_a, mean_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * (pa - mean_a).square()).sum()
            var_b = (window * (pb - mean_b).square()).sum()
            cov = (window * (pa - mean_a) * (pb - mean_b)).sum()
            numerator = (2 * mean_a * mean_b + 1e-4) * (2 * cov + 9e-4)
            values.append(numerator / ((mean_a**2 + mean_b**2 + 1e-4) * (var_a + var_b + 9e-4)))
    return float(torch.stack(values).mean())


def test_ssim_matches_naive_window_by_window_reference_and_averages_channels() -> None:
    a, b = _random_images(13, 14, 2), _random_images(13, 14, 2, seed=5)
    expected = sum(_naive_ssim_one_channel(a[..., c], b[..., c]) for c in range(2)) / 2
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_is_symmetric_and_accepts_uint8() -> None:
    a = (torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    b = (torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    assert torch.allclose(ssim(a, b), ssim(b, a))
    assert ssim(a, b).shape == (2,)


def test_ssim_refuses_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(8, 8, 3), torch.zeros(8, 8, 3))


def test_delta_t_psnr_is_difference_of_mean_psnrs() -> None:
    truth = torch.zeros(4, 8, 8, 3)
    inferred = torch.full_like(truth, 0.01)  # 40 dB
    random = torch.full_like(truth, 0.1)  # 20 dB
    assert delta_t_psnr(truth, inferred, random) == pytest.approx(20.0, abs=1e-4)
    assert delta_t_psnr(truth, random, inferred) == pytest.approx(-20.0, abs=1e-4)


def test_contingency_counts_pairs() -> None:
    table = contingency(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 1, 0, 0, 1, 1]), 3, 2)
    assert table.tolist() == [[0, 2], [1, 0], [1, 2]]
    assert action_purity(table) == pytest.approx(5 / 6)


def test_contingency_refuses_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="latent labels"):
        contingency(torch.tensor([0, 3]), torch.tensor([0, 1]), 3, 2)


def test_nmi_is_one_for_identical_and_relabelled_partitions() -> None:
    labels = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(0))
    relabelled = (labels * 7 + 3) % 11  # a bijection onto other label values
    assert normalized_mutual_information(labels, labels) == pytest.approx(1.0)
    assert normalized_mutual_information(labels, relabelled) == pytest.approx(1.0)


def test_nmi_of_independent_labels_is_near_zero() -> None:
    generator = torch.Generator().manual_seed(1)
    labels_a = torch.randint(0, 8, (10_000,), generator=generator)
    labels_b = torch.randint(0, 8, (10_000,), generator=generator)
    assert normalized_mutual_information(labels_a, labels_b) < 0.05


def test_nmi_matches_hand_computed_small_example() -> None:
    # Joint p: (0,0)=1/2, (1,0)=1/4, (1,1)=1/4; marginals a=(1/2,1/2), b=(3/4,1/4).
    mutual_information = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    entropy_a = math.log(2)
    entropy_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual_information / ((entropy_a + entropy_b) / 2)
    assert expected == pytest.approx(0.343712, abs=1e-6)
    nmi = normalized_mutual_information(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
    assert nmi == pytest.approx(expected, rel=1e-12)


def test_nmi_edge_cases_follow_sklearn() -> None:
    constant = torch.zeros(10, dtype=torch.long)
    assert normalized_mutual_information(constant, constant + 4) == 1.0
    assert normalized_mutual_information(constant, torch.arange(10)) == pytest.approx(0.0)


def test_maskgit_schedule_endpoints_midpoint_and_monotonicity() -> None:
    assert maskgit_mask_schedule(0, 8) == 1.0
    assert maskgit_mask_schedule(8, 8) == 0.0
    assert maskgit_mask_schedule(4, 8) == pytest.approx(math.cos(math.pi / 4))
    values = [maskgit_mask_schedule(step, 25) for step in range(26)]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_maskgit_schedule_refuses_out_of_range_steps() -> None:
    with pytest.raises(ValueError):
        maskgit_mask_schedule(9, 8)
    with pytest.raises(ValueError):
        maskgit_mask_schedule(0, 0)


def test_codebook_perplexity_counts_effectively_used_codes() -> None:
    assert codebook_perplexity(torch.tensor([0, 5, 0, 0])) == pytest.approx(1.0)
    assert codebook_perplexity(torch.tensor([3, 3, 3, 3, 0, 0])) == pytest.approx(4.0)
    assert 1.0 < codebook_perplexity(torch.tensor([10.0, 1.0])) < 2.0
    with pytest.raises(ValueError, match="all zero"):
        codebook_perplexity(torch.zeros(4))


def test_sharpness_of_a_flat_image_is_zero_and_of_a_checkerboard_is_known() -> None:
    flat = torch.full((2, 8, 8, 3), 0.5)
    assert torch.equal(sharpness(flat), torch.zeros(2))
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((rows + cols) % 2).float()[..., None].expand(8, 8, 3)
    # Each interior pixel differs by 1 from its four neighbours: |4 * v - 4 * (1 - v)| = 4.
    assert sharpness(checker).item() == pytest.approx(4.0)
    assert sharpness((checker * 255).to(torch.uint8)).item() == pytest.approx(4.0)


def test_blurring_lowers_sharpness() -> None:
    images = _random_images(1, 16, 16, 3)
    blurred = (images + images.roll(1, dims=1) + images.roll(1, dims=2) + images.roll((1, 1), dims=(1, 2))) / 4
    assert sharpness(blurred).item() < 0.6 * sharpness(images).item()


def test_vertical_repeat_rate_counts_tokens_equal_to_the_one_above() -> None:
    streaks = torch.arange(4).repeat(3, 1)  # [3 rows, 4 columns], every column one token
    assert vertical_repeat_rate(streaks).item() == 1.0
    assert vertical_repeat_rate(streaks.T).item() == 0.0  # horizontal bands: no token repeats the one above
    half = torch.tensor([[1, 2], [1, 3]])
    assert vertical_repeat_rate(torch.stack([half, streaks[:2, :2]])).tolist() == [0.5, 1.0]
