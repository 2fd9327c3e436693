"""The MaskGIT dynamics model: training signal, sampling, and KV-cached stepping equal to recomputation."""

import pytest
import torch

from genie_models.dynamics import DynamicsModel, maskgit_sample, sample_tokens
from genie_models.stepping import DynamicsEngine, StepRequest


def test_sampling_is_greedy_at_temperature_zero():
    logits = torch.randn(2, 5, 7)
    ids, probability = sample_tokens(logits, torch.zeros(2), torch.rand(2, 5))
    assert torch.equal(ids, logits.argmax(-1))
    torch.testing.assert_close(probability, logits.softmax(-1).max(-1).values)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[[0.2, 0.8]]])).expand(1, 4000, 2)
    ids, _ = sample_tokens(logits, torch.ones(1), torch.rand(1, 4000))
    assert abs(float(ids.float().mean()) - 0.8) < 0.03


@pytest.mark.parametrize("num_steps", [1, 4])  # 1: the tiny preset's single pass
def test_maskgit_fills_every_position_in_the_given_steps(num_steps):
    calls = []

    def predict(tokens):
        calls.append((tokens == 99).sum().item())
        return torch.randn(tokens.shape[0], tokens.shape[1], 10)

    tokens = maskgit_sample(predict, mask_id=99, num_steps=num_steps, temperature=torch.ones(3),
                            uniforms=torch.rand(3, num_steps, 16))
    assert (tokens != 99).all() and tokens.max() < 10
    assert len(calls) == num_steps
    assert calls == sorted(calls, reverse=True) and calls[0] == 3 * 16  # fewer masked each pass


def test_dynamics_overfits_a_token_sequence(dynamics_config):
    model = DynamicsModel(dynamics_config)
    tokens = torch.randint(0, 64, (2, 4, 16))
    actions = torch.randint(0, 4, (2, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        out = model.loss(tokens, actions)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert float(out.accuracy) > 0.9


@pytest.mark.parametrize("variant", [{}, {"copy_window": (2, 1), "expected_code_decoding": True}])
def test_cached_step_logits_match_full_context_recomputation(dynamics_config, variant):
    from dataclasses import replace
    dynamics_config = replace(dynamics_config, **variant)
    model = DynamicsModel(dynamics_config).eval()
    history = torch.randint(0, 64, (1, 3, 16))
    history_actions = torch.tensor([[dynamics_config.no_action_id, 1, 2]])
    new_frame = torch.randint(0, 65, (1, 1, 16))  # partly masked, as in a MaskGIT pass
    action = torch.tensor([[3]])
    full = model(torch.cat([history, new_frame], 1), torch.cat([history_actions, action], 1))[:, -1]
    engine = DynamicsEngine(model, max_sessions=2)
    engine.start("w", history[0], history_actions[0])
    slots = engine.sessions.slots(["w"])
    cached = model(new_frame, action, cache=engine.sessions.view(slots), previous_tokens=history[:, -1:])[:, 0]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_engine_steps_are_reproducible_and_batch_independent(dynamics_config):
    model = DynamicsModel(dynamics_config).eval()
    history = torch.randint(0, 64, (1, 16))
    start = torch.tensor([dynamics_config.no_action_id])

    def run(sessions):
        engine = DynamicsEngine(model, max_sessions=4)
        for name in sessions:
            engine.start(name, history, start)
        requests = [StepRequest(name, 1, seed=7 if name == "a" else 8, step_index=0, num_steps=4, temperature=1.0)
                    for name in sessions]
        return engine.step(requests)

    alone = run(["a"])
    batched = run(["b", "a", "c"])
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[1])  # a different seed samples differently


def test_the_action_token_variant_and_the_added_embedding_variant_both_steer_and_cache(dynamics_config):
    from dataclasses import replace
    for config in (dynamics_config, replace(dynamics_config, action_as_token=False, tie_embeddings=False)):
        model = DynamicsModel(config).eval()
        tokens = torch.randint(0, 64, (1, 2, 16))
        left = model(tokens, torch.tensor([[config.no_action_id, 0]]))[:, -1]
        right = model(tokens, torch.tensor([[config.no_action_id, 1]]))[:, -1]
        assert left.shape == (1, 16, config.num_codes)
        assert not torch.allclose(left, right)  # the action reaches the frame it led to
        engine = DynamicsEngine(model, max_sessions=1)
        engine.start("w", tokens[0, :1], torch.tensor([config.no_action_id]))
        assert engine.sessions.cache.keys.shape[2] == config.frame_length


def test_an_untrained_model_already_prefers_the_previous_frames_token(dynamics_config):
    model = DynamicsModel(dynamics_config).eval()
    previous = torch.randint(0, 64, (1, 1, 16))
    masked = torch.full((1, 1, 16), dynamics_config.mask_id)
    tokens = torch.cat([previous, masked], dim=1)
    logits = model(tokens, torch.tensor([[dynamics_config.no_action_id, 0]]))[:, -1]
    assert torch.equal(logits.argmax(-1), previous[:, 0])  # the copy bonus: "nothing changes" by default
    chance = logits.detach().softmax(-1).gather(-1, previous[:, 0, :, None]).mean()
    assert 0.3 < float(chance) < 0.7  # even odds against the rest of the vocabulary, not a certainty


@pytest.mark.parametrize("within_frame", [True, False])
def test_the_pointer_copy_is_a_distribution_that_can_point_at_a_neighbouring_position(dynamics_config, within_frame):
    from dataclasses import replace
    config = replace(dynamics_config, copy_window=(1, 1), pointer_within_frame=within_frame)
    model = DynamicsModel(config).eval()
    previous = torch.randint(0, 64, (1, 1, 16))
    tokens = torch.cat([previous, torch.full_like(previous, config.mask_id)], dim=1)
    actions = torch.tensor([[config.no_action_id, 0]])
    log_p = model(tokens, actions)[:, -1]  # [1, S, V]
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(1, 16))
    assert torch.equal(log_p.argmax(-1), previous[:, 0])  # untrained: "nothing moved"
    with torch.no_grad():  # all pointer weight on the position one row below; next, same position or generate
        model.copy_head.bias.fill_(-50.0)
        model.copy_head.bias[model.copy_offsets.index((1, 0))] = 50.0
        model.copy_head.bias[model.copy_offsets.index((0, 0))] = model.copy_head.bias[-1] = 0.0
    grid = previous[0, 0].reshape(4, 4)
    log_p = model(tokens, actions)[0, -1].reshape(4, 4, -1)
    assert torch.equal(log_p[:3].argmax(-1), grid[1:])  # every row but the last shows the row below it
    # The last row has no row below: inside the frame, that choice becomes generate (not the next choice,
    # "same position"); clamped (older checkpoints) the edge row is copied onto itself. Either copy would
    # smear the edge row inward, scroll after scroll.
    edge_copy = log_p[3].gather(-1, grid[3, :, None]).exp()
    assert bool((edge_copy < 0.2).all() if within_frame else (edge_copy > 0.99).all()), edge_copy


def test_expected_code_decoding_picks_the_code_nearest_the_mean_not_the_likeliest_code():
    from genie_models.dynamics import expected_code_scores
    # Code 0 points one way; codes 1 and 2 almost the other way, close to each other.
    codes = torch.tensor([[1.0, 0.0], [-0.6, 1.0], [-0.4, 1.0]])
    logits = torch.log(torch.tensor([0.4, 0.3, 0.3]))  # the likeliest single code is 0 ...
    scores = expected_code_scores(logits, codes)
    assert logits.argmax() == 0
    assert scores.argmax() in (1, 2)  # ... but 60% of the mass says "that other direction"
    confident = expected_code_scores(torch.log(torch.tensor([0.98, 0.01, 0.01])), codes)
    assert confident.argmax() == 0


@pytest.mark.parametrize("copy_window,action_pointer", [((0, 0), False), ((1, 1), False), ((1, 1), True)])
def test_sampling_scores_equal_expected_code_scores_of_the_full_distribution(dynamics_config, copy_window,
                                                                              action_pointer):
    """Sampling sums the pointer's expected code part by part; it must equal the expectation under the full
    mixed distribution that the model is trained on."""
    from dataclasses import replace

    from genie_models.dynamics import expected_code_scores
    config = replace(dynamics_config, copy_window=copy_window, expected_code_decoding=True, code_dim=8,
                     action_pointer=action_pointer)
    model = DynamicsModel(config).eval()
    model.use_codebook(torch.randn(config.num_codes, config.code_dim))
    with torch.no_grad():  # a pointer that is not the untrained "copy the same position"
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    tokens = torch.randint(0, config.num_codes, (2, 3, 16))
    tokens[:, -1, ::3] = config.mask_id
    actions = torch.randint(0, config.num_actions, (2, 3))
    with torch.no_grad():
        want = expected_code_scores(model(tokens, actions), model.code_vectors)
        got = model.sampling_logits(tokens, actions)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got.argmax(-1), model(tokens, actions).argmax(-1))  # not the likeliest code


@pytest.mark.parametrize("expected_code_decoding", [False, True])
def test_action_guidance_scales_the_action_pointer_when_sampling_and_not_in_training(dynamics_config,
                                                                                    expected_code_decoding):
    """Guidance g samples as a model whose action-pointer table is g times larger would; the training loss
    (the model as trained) does not see it."""
    from dataclasses import replace
    config = replace(dynamics_config, copy_window=(1, 1), action_pointer=True, code_dim=8,
                     expected_code_decoding=expected_code_decoding)
    torch.manual_seed(0)
    model = DynamicsModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    if expected_code_decoding:
        model.use_codebook(torch.randn(config.num_codes, config.code_dim))
    guided = DynamicsModel(replace(config, action_guidance=2.5)).eval()
    guided.load_state_dict(model.state_dict())
    scaled = DynamicsModel(config).eval()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.action_pointer.weight.mul_(2.5)
    tokens = torch.randint(0, config.num_codes, (2, 3, 16))
    tokens[:, -1, ::2] = config.mask_id
    actions = torch.randint(0, config.num_actions, (2, 3))
    with torch.no_grad():
        got, want = guided.sampling_logits(tokens, actions), scaled.sampling_logits(tokens, actions)
        plain = model.sampling_logits(tokens, actions)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # scores x50: float rounding shows
        assert (got - plain).abs().max() > 0.1  # guidance changed what sampling draws from
        # A window run without a cache scores just its newest frame, with the same guidance.
        torch.testing.assert_close(guided.sampling_logits(tokens, actions, newest_only=True), got[:, -1:])
        clip = torch.randint(0, config.num_codes, (2, 3, 16))
        torch.manual_seed(1)
        guided_loss = guided.loss(clip, actions[:, 1:]).loss
        torch.manual_seed(1)
        torch.testing.assert_close(guided_loss, model.loss(clip, actions[:, 1:]).loss)


def test_each_world_of_a_batch_plays_its_own_action_guidance(dynamics_config):
    """Worlds stepped together with different guidance each get what they would alone; a world that sends
    none plays the model's own (bit for bit as one that sends that value); the value changes the frame."""
    from dataclasses import replace
    config = replace(dynamics_config, copy_window=(1, 1), action_pointer=True, action_guidance=2.0,
                     num_maskgit_steps=2, temperature=0.0)
    torch.manual_seed(0)
    model = DynamicsModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    history = torch.randint(0, config.num_codes, (2, config.tokens_per_frame))
    guidance = [None, 2.0, 0.0, 0.25]

    def step(engine: DynamicsEngine, worlds: list[int]) -> torch.Tensor:
        return engine.step([StepRequest(world, 1, 5, 2, 2, 0.0, guidance[world]) for world in worlds])

    together = DynamicsEngine(model, max_sessions=len(guidance))
    for world in range(len(guidance)):
        together.start(world, history, torch.tensor([config.num_actions, 1]))
    batched = step(together, list(range(len(guidance))))
    for world in range(len(guidance)):
        alone = DynamicsEngine(model, max_sessions=1)
        alone.start(world, history, torch.tensor([config.num_actions, 1]))
        assert torch.equal(step(alone, [world])[0], batched[world]), f"guidance {guidance[world]}"
    assert torch.equal(batched[0], batched[1])  # None: the model's own 2.0
    assert not torch.equal(batched[1], batched[2]) and not torch.equal(batched[1], batched[3])


def scrolling_clips(batch: int, frames: int, grid: int, num_codes: int, generator: torch.Generator):
    """Random token grids where action 1 scrolls the scene up one row (a new random bottom row) and action 0
    keeps it still -> (tokens [B, T, grid * grid], actions [B, T - 1])."""
    actions = torch.randint(0, 2, (batch, frames - 1), generator=generator)
    frame = torch.randint(0, num_codes, (batch, grid, grid), generator=generator)
    clip = [frame]
    for t in range(frames - 1):
        scrolled = torch.cat([frame[:, 1:], torch.randint(0, num_codes, (batch, 1, grid), generator=generator)], 1)
        frame = torch.where(actions[:, t, None, None] == 1, scrolled, frame)
        clip.append(frame)
    return torch.stack(clip, dim=1).flatten(2), actions


def shares_right_after_training(config, steps: int) -> tuple[float, float]:
    """Train on scrolling_clips for a few steps -> share of predictable next-frame tokens right after action 0
    (still) and after action 1 (scroll up; its new bottom row cannot be known)."""
    torch.manual_seed(0)
    model = DynamicsModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(*scrolling_clips(16, 3, 4, config.num_codes, generator)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tokens, actions = scrolling_clips(64, 2, 4, config.num_codes, generator)
    no_action = torch.full((64, 1), config.no_action_id)
    masked = torch.cat([tokens[:, :1], torch.full_like(tokens[:, 1:], config.mask_id)], dim=1)
    with torch.no_grad():
        predicted = model(masked, torch.cat([no_action, actions], dim=1))[:, 1].argmax(-1)
    correct = (predicted == tokens[:, 1]).reshape(64, 4, 4)
    return tuple(float(correct[actions[:, 0] == action][:, :rows].float().mean()) for action, rows in ((0, 4), (1, 3)))


def test_the_action_pointer_learns_which_way_each_action_moves_the_scene_in_few_steps(dynamics_config):
    from dataclasses import replace
    with_bias = shares_right_after_training(replace(dynamics_config, copy_window=(1, 0), action_pointer=True), 20)
    assert min(with_bias) > 0.95, with_bias
    # The same model without the bias still points every position one row down whatever the action.
    without = shares_right_after_training(replace(dynamics_config, copy_window=(1, 0), action_pointer=False), 20)
    assert min(without) < 0.6, without


def memory_model(dynamics_config, memory: int = 4, within_frame: bool = False) -> DynamicsModel:
    """A 4x4-token model whose action pointer says: action 1 scrolls the view up a row (each position reads the
    row above it), action 2 down a row, action 0 keeps it still."""
    from dataclasses import replace
    config = replace(dynamics_config, copy_window=(1, 1), action_pointer=True, pointer_memory=memory,
                     pointer_within_frame=within_frame)
    model = DynamicsModel(config).eval()
    with torch.no_grad():
        for action, offset in ((0, (0, 0)), (1, (-1, 0)), (2, (1, 0))):
            model.action_pointer.weight[action, model.copy_offsets.index(offset)] = 1.0
    return model


@pytest.mark.parametrize("within_frame", [True, False])
def test_without_memory_the_pointer_reads_the_previous_frame_repeated_or_blank_past_its_edges(dynamics_config,
                                                                                             within_frame):
    model = memory_model(dynamics_config, memory=0, within_frame=within_frame)
    previous = torch.randint(0, 64, (2, 1, 16))
    sources = model.pointer_sources(previous)  # [2, 6 * 6]: the 4x4 frame padded by one row/column
    grid = previous.reshape(2, 4, 4)
    for row in range(-1, 5):
        for column in range(-1, 5):
            inside = 0 <= row < 4 and 0 <= column < 4
            want = grid[:, min(max(row, 0), 3), min(max(column, 0), 3)]
            if within_frame and not inside:
                want = torch.full_like(want, model.config.mask_id)
            assert torch.equal(sources[:, (row + 1) * 6 + column + 1], want), (row, column)
    # Each offset of each position reads its neighbour in that padding.
    neighbours = model._neighbours(sources)  # [2, 16, 9]
    assert torch.equal(neighbours[:, 5, model.copy_offsets.index((-1, 1))], grid[:, 0, 2])
    assert torch.equal(neighbours[:, 0, model.copy_offsets.index((-1, -1))], sources[:, 0])


def test_a_view_that_scrolls_back_shows_the_row_it_left(dynamics_config):
    model = memory_model(dynamics_config)
    mask = model.config.mask_id
    first = torch.arange(16).reshape(4, 4)  # rows 0..3 of a scene
    up = torch.cat([torch.full((1, 4), 20), first[:3]])  # scrolled up a row: a new top row, row 3 left the view
    frames = torch.stack([torch.full((4, 4), mask), first, up]).reshape(1, 3, 16)  # oldest first, one not yet
    actions = torch.tensor([[model.config.no_action_id, model.config.no_action_id, 1]])
    sources = model.pointer_sources(frames, actions).reshape(6, 6)
    assert torch.equal(sources[5, 1:5], first[3])  # below the view: the row that scrolled out of it
    assert torch.equal(sources[0, 1:5], up[0])  # above it nothing was ever seen: the edge repeats
    assert torch.equal(sources[1:5, 1:5], up)
    # Without memory the row below repeats the edge; a world stepping back down then copies that row instead.
    assert torch.equal(model.pointer_sources(frames[:, -1:])[0].reshape(6, 6)[5, 1:5], up[3])
    engine = DynamicsEngine(model, max_sessions=1)
    engine.start("w", frames[0, 1:], actions[0, 1:])
    with torch.no_grad():  # the pointer alone decides: action 2 reads the row below every position
        model.action_pointer.weight[2] *= 100
    down = engine.step([StepRequest("w", 2, seed=0, step_index=0, num_steps=4, temperature=0.0)])[0].reshape(4, 4)
    assert torch.equal(down, first)


def test_a_world_with_memory_continues_identically_after_a_rebuild_whatever_it_was_batched_with(dynamics_config):
    model = memory_model(dynamics_config, memory=8)  # more frames than the transformer's receptive field (6)
    with torch.no_grad():  # the pointer follows the actions, so what it remembers decides frames
        model.action_pointer.weight.mul_(5)
    generator = torch.Generator().manual_seed(0)
    actions = torch.randint(0, 3, (12,), generator=generator)

    def request(name, step):
        return StepRequest(name, int(actions[step]), seed=1, step_index=step, num_steps=4, temperature=1.0)

    engine = DynamicsEngine(model, max_sessions=3)
    prompt = torch.randint(0, 64, (1, 16), generator=generator)
    engine.start("a", prompt, torch.tensor([model.config.no_action_id]))
    engine.start("other", torch.randint(0, 64, (1, 16), generator=generator), torch.tensor([0]))
    tokens, history_actions = [prompt[0]], [model.config.no_action_id]
    for step in range(10):  # batched with another world on odd steps
        batch = [request("a", step)] + ([request("other", step)] if step % 2 else [])
        tokens.append(engine.step(batch)[0])
        history_actions.append(int(actions[step]))
    # Rebuilt from the last frames the models depend on (the window), at their positions: the same next frames.
    history = max(model.config.transformer_config().receptive_frames, model.config.pointer_memory)
    rebuilt = DynamicsEngine(model, max_sessions=1)
    rebuilt.start("a", torch.stack(tokens[-history:]), torch.tensor(history_actions[-history:]),
                  first_position=len(tokens) - min(history, len(tokens)))
    for step in (10, 11):
        assert torch.equal(rebuilt.step([request("a", step)])[0], engine.step([request("a", step)])[0])


def test_memory_needs_the_action_pointer(dynamics_config):
    from dataclasses import replace
    with pytest.raises(ValueError, match="action pointer"):
        DynamicsModel(replace(dynamics_config, copy_window=(1, 1), pointer_memory=4))
