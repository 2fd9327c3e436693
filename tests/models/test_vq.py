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


def _restart_on_two_ranks(rank: int, port: int, batch: torch.Tensor, results) -> None:
    """Rank `rank` of a 2-process gloo group: one training call on its half of batch, restarting dead codes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        vq = VectorQuantizer(num_codes=32, code_dim=4, restart_every=1)
        torch.manual_seed(1)  # different random numbers per rank after init: rank 0's must be the ones used
        torch.rand(rank + 1)
        vq(batch.chunk(2)[rank])
        results[rank] = (vq.codebook.detach().clone(), vq.usage.clone())
    finally:
        dist.destroy_process_group()


def test_dead_code_restarts_on_two_ranks_equal_one_process_on_the_whole_batch():
    """Counts are global and restarts draw from the global batch with rank 0's random numbers."""
    import torch.multiprocessing as mp

    from tests.services.helpers import free_port

    batch = torch.randn(2, 40, 4) * torch.tensor([0.1, 1, 1, 1])
    torch.manual_seed(0)
    alone = VectorQuantizer(num_codes=32, code_dim=4, restart_every=1)
    torch.manual_seed(1)
    torch.rand(1)  # as rank 0 does
    alone(batch.flatten(0, 1))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_restart_on_two_ranks, args=(free_port(), batch.flatten(0, 1), results), nprocs=2)
        (codes_0, usage_0), (codes_1, usage_1) = results[0], results[1]
    assert (alone.usage < alone.dead_code_threshold / 32).sum() > 0  # some codes were restarted
    torch.testing.assert_close(usage_0, alone.usage)
    torch.testing.assert_close(codes_0, alone.codebook.detach())
    assert torch.equal(codes_0, codes_1) and torch.equal(usage_0, usage_1)
