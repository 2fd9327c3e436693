"""The vector quantizer: straight-through gradients, codebook learning, dead-code restarts."""

import torch

from genie_models.vq import VectorQuantizer


def test_gradients_pass_straight_through_to_the_input():
    vq = VectorQuantizer(num_codes=16, code_dim=4)
    z = torch.randn(10, 4, requires_grad=True)
    out = vq(z)
    (out.quantized * torch.arange(4.0)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_quantized_values_are_codebook_entries():
    vq = VectorQuantizer(num_codes=16, code_dim=4).eval()
    out = vq(torch.randn(50, 4))
    torch.testing.assert_close(out.quantized, vq.codes()[out.ids])


def test_dead_codes_are_restarted_and_usage_spreads():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, code_dim=4, restart_every=10)
    # Put every code in one corner of the sphere, far from the data: all but one start dead.
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([1.0, 0, 0, 0]) + 0.001 * torch.randn(32, 4))
    optimizer = torch.optim.Adam(vq.parameters(), lr=1e-2)
    data = torch.randn(512, 4) * torch.tensor([0.1, 1, 1, 1])
    for _ in range(300):
        out = vq(data[torch.randint(0, 512, (128,))])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    used = torch.unique(vq.eval()(data).ids).numel()
    assert used >= 24, f"only {used} of 32 codes in use"
    assert vq.usage_fraction() > 0.7
    assert vq.perplexity() > 16


def test_sticky_codes_keep_a_previous_code_only_within_the_margin():
    from genie_models.vq import sticky_codes
    # One position, three frames, three codes. Frame 1's best code (2) beats frame 0's code (0) by 0.01:
    # kept. Frame 2's best code (1) beats the kept code 0 by 0.3: switched.
    similarity = torch.tensor([[[[0.9, 0.1, 0.2]], [[0.80, 0.0, 0.81]], [[0.5, 0.8, 0.0]]]])
    assert sticky_codes(similarity, margin=0.02).flatten().tolist() == [0, 0, 1]
    assert sticky_codes(similarity, margin=0.0).flatten().tolist() == [0, 2, 1]  # plain nearest codes
