"""Sampling: parameter validation and what each filter / penalty does to known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from zen_eco.engine.sampling import Sampler, SamplingParams
from zen_eco.errors import SamplingError, ZenError


def logits_for(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (up to float rounding)."""
    return torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs], dtype=torch.float32)


def draw(params: SamplingParams, logits: torch.Tensor, n: int, prompt: list[int] = ()) -> list[int]:
    sampler = Sampler(params, logits.numel(), list(prompt))
    return [sampler(logits)[0] for _ in range(n)]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", 1e9), ("temperature", "hot"),
        ("temperature", None),
        ("top_k", -1), ("top_k", 2.5), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", "0.9"),
        ("min_p", -0.01), ("min_p", 1.01),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 11.0),
        ("presence_penalty", 2.5), ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0), ("frequency_penalty", float("nan")),
        ("seed", "42"), ("seed", -1), ("seed", 2**64), ("seed", 1.5),
    ],
)
def test_bad_field_raises_sampling_error_naming_it(field, value):
    with pytest.raises(SamplingError, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ZenError)


def test_valid_edges_are_accepted():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=10.0,
                   presence_penalty=-2.0, frequency_penalty=2.0, seed=0)
    SamplingParams(temperature=1, top_p=1, seed=2**64 - 1)  # ints where floats are expected are fine


# --------------------------------------------------------------------------- greedy / seeds


def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen) * 3
        token, _ = Sampler(SamplingParams.greedy(), 1000, [])(logits)
        assert token == int(torch.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(500)  # flat: every token equally likely
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = draw(SamplingParams(seed=123, **params), logits, 50)
    b = draw(SamplingParams(seed=123, **params), logits, 50)
    c = draw(SamplingParams(seed=124, **params), logits, 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 30  # really random over the flat distribution, not stuck on one token


def test_top_k_1_is_greedy():
    gen = torch.Generator().manual_seed(1)
    for seed in range(10):
        logits = torch.randn(300, generator=gen)
        tokens = draw(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=seed), logits, 5)
        assert tokens == [int(torch.argmax(logits))] * 5


def test_top_k_keeps_only_the_k_most_likely():
    logits = logits_for([0.3, 0.25, 0.2, 0.15, 0.1])
    tokens = draw(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=3), logits, 400)
    assert set(tokens) == {0, 1}


# --------------------------------------------------------------------------- top-p / min-p


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # sorted probabilities 0.4, 0.3, 0.2, 0.06, 0.04 (shuffled in the vocabulary)
    probs = [0.06, 0.3, 0.04, 0.4, 0.2]
    logits = logits_for(probs)
    # p = 0.65: 0.4 < 0.65, 0.4 + 0.3 = 0.7 >= 0.65 -> nucleus {3, 1}
    tokens = draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.65, min_p=0.0, seed=7), logits, 1000)
    assert set(tokens) == {3, 1}
    # the kept mass is renormalised: 0.4/0.7 vs 0.3/0.7
    assert 0.5 < tokens.count(3) / len(tokens) < 0.65
    # p = 0.85: 0.7 < 0.85 -> add 0.2 -> {3, 1, 4}; the two smallest are never drawn
    tokens = draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.85, min_p=0.0, seed=8), logits, 1000)
    assert set(tokens) == {3, 1, 4}
    # p just above the top probability -> exactly two tokens; just below -> only the top one
    assert set(draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.41, min_p=0.0, seed=9), logits, 300)) == {3, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_k=0, top_p=0.39, min_p=0.0, seed=9), logits, 300)) == {3}


def test_min_p_cuts_tokens_below_min_p_times_p_max():
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    logits = logits_for(probs)
    # min_p 0.25 -> threshold 0.125: tokens 0, 1, 2 stay; 3 (0.1) and 4 (0.05) go
    tokens = draw(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=11), logits, 1500)
    assert set(tokens) == {0, 1, 2}
    # min_p 0.15 -> threshold 0.075: token 3 comes back
    tokens = draw(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.15, seed=12), logits, 1500)
    assert set(tokens) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens():
    logits = logits_for([0.6, 0.3, 0.1])
    cold = draw(SamplingParams(temperature=0.2, top_k=0, top_p=1.0, min_p=0.0, seed=5), logits, 1000)
    hot = draw(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=5), logits, 1000)
    assert cold.count(0) > 950  # 0.6^5 / (0.6^5 + 0.3^5 + 0.1^5) = 0.97
    assert 250 < hot.count(0) < 450  # close to flat


# --------------------------------------------------------------------------- penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 5, prompt_ids=[0, 1])
    sampler.accept(3)  # seen in the output counts too
    out = sampler.penalize(logits)
    assert torch.equal(out, torch.tensor([1.0, -4.0, 1.0, -2.0, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # input left alone


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([3.0, 2.0, 0.0])
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 3, prompt_ids=[0])
    assert sampler(logits)[0] == 1  # 3/2 = 1.5 < 2


def test_presence_and_frequency_penalties_follow_openai():
    # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c = count in the output
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 4, prompt_ids=[3])
    for t in (0, 0, 0, 1):
        sampler.accept(t)
    out = sampler.penalize(logits)
    expected = torch.tensor([1.0 - 3 * 0.25 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0])  # the prompt token is not penalised
    torch.testing.assert_close(out, expected)


def test_negative_presence_penalty_encourages_repeats():
    logits = torch.tensor([1.0, 1.2])
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=-1.0), 2, prompt_ids=[])
    sampler.accept(0)
    assert sampler(logits)[0] == 0


@pytest.mark.parametrize("greedy", [True, False])
def test_logprob_is_log_softmax_of_penalised_logits(greedy):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(200, generator=gen) * 2
    params = SamplingParams(temperature=0.0 if greedy else 0.7, top_k=20, top_p=0.9, min_p=0.0,
                            repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, seed=4)
    prompt = [int(i) for i in torch.topk(logits, 5).indices]
    sampler = Sampler(params, 200, prompt)
    for t in prompt[:3]:
        sampler.accept(t)
    for _ in range(10):
        penalised = sampler.penalize(logits)
        token, logprob = sampler(logits)
        assert logprob == pytest.approx(float(torch.log_softmax(penalised, -1)[token]), abs=1e-5)
        assert logprob < 0
        sampler.accept(token)
