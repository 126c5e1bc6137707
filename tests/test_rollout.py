import torch

from opo.models import eos_ids
from opo.rollout import HFEngine, SamplingParams
from opo.sequences import pack, score


def test_engine_samples_k_per_prompt_with_version_stamp(micro_policy):
    model, tok = micro_policy
    engine = HFEngine(model, tok, eos_ids(model, tok))
    prompts = [tok("12+3=")["input_ids"], tok("7+45=")["input_ids"]]
    batch = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6))
    assert len(batch) == 6
    assert batch.group_ids == [0, 0, 0, 1, 1, 1]
    assert batch.prompt_ids[:3] == [prompts[0]] * 3 and batch.prompt_ids[3] == prompts[1]
    assert batch.policy_version == 0
    for ids, reason in zip(batch.response_ids, batch.finish_reasons):
        assert 1 <= len(ids) <= 6
        if reason == "stop":
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        else:
            assert reason == "length" and len(ids) == 6 and tok.eos_token_id not in ids
    engine.sync_weights(model, 3)
    assert engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2)).policy_version == 3


def test_greedy_is_deterministic_and_sampling_follows_the_seed(micro_policy):
    model, tok = micro_policy
    engine = HFEngine(model, tok, eos_ids(model, tok))
    prompts = [tok("12+3=")["input_ids"], tok("999+1=")["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert engine.generate(prompts, greedy).response_ids == engine.generate(prompts, greedy).response_ids
    sample = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
    torch.manual_seed(3)
    a = engine.generate(prompts, sample).response_ids
    torch.manual_seed(3)
    assert engine.generate(prompts, sample).response_ids == a


def test_score_matches_a_per_sequence_forward(micro_policy):
    """The packed, windowed log-probs equal those of each sequence run on its own."""
    model, tok = micro_policy
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    responses = [[4, 1], [6, 7, 8, 1], [3]]
    packed = pack(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        logp, entropy = score(model, packed, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            expect = full[len(p) - 1:, :].gather(-1, ids[0, len(p):, None]).squeeze(-1)
            got = logp[i][packed.response_mask[i].bool()]
            assert torch.allclose(got, expect, atol=1e-5)
    assert packed.response_mask.sum() == sum(map(len, responses))
    assert entropy.shape == logp.shape and (entropy >= 0).all()
