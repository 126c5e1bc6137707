"""Rollout engines and trainer-side scoring: what is sampled is what is scored."""

import pytest
import torch

from opo.models import eos_ids, load_policy
from opo.rollout import SamplingParams, make_engine
from opo.sampling import filter_logits
from opo.sequences import Dist, pack, plan_micro_batches, score

ENGINES = ["fast", "hf"]


def _prompts(tok):
    return [tok("12+3=")["input_ids"], tok("7+45=")["input_ids"], tok("999+1=")["input_ids"]]


@pytest.mark.parametrize("kind", ENGINES)
def test_engine_samples_k_per_prompt_with_version_stamp(micro_policy, kind):
    model, tok = micro_policy
    engine = make_engine(kind, model, tok, eos_ids(model, tok))
    prompts = _prompts(tok)[:2]
    batch = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6))
    assert len(batch) == 6
    assert batch.group_ids == [0, 0, 0, 1, 1, 1]
    assert batch.prompt_ids[:3] == [prompts[0]] * 3 and batch.prompt_ids[3] == prompts[1]
    assert batch.policy_version == 0
    assert [len(lp) for lp in batch.logprobs] == batch.lengths
    for ids, reason in zip(batch.response_ids, batch.finish_reasons):
        assert 1 <= len(ids) <= 6
        if reason == "stop":
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        else:
            assert reason == "length" and len(ids) == 6 and tok.eos_token_id not in ids
    engine.sync_weights(model, 3)
    assert engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2)).policy_version == 3


@pytest.mark.parametrize("kind", ENGINES)
def test_greedy_is_deterministic_and_sampling_follows_the_seed(micro_policy, kind):
    model, tok = micro_policy
    engine = make_engine(kind, model, tok, eos_ids(model, tok), batch_size=4)
    prompts = _prompts(tok)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert engine.generate(prompts, greedy).response_ids == engine.generate(prompts, greedy).response_ids
    sample = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
    torch.manual_seed(3)
    a = engine.generate(prompts, sample).response_ids
    torch.manual_seed(3)
    assert engine.generate(prompts, sample).response_ids == a


def test_both_engines_agree_on_greedy_responses(micro_policy):
    model, tok = micro_policy
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    fast = make_engine("fast", model, tok, eos_ids(model, tok)).generate(_prompts(tok), greedy)
    ref = make_engine("hf", model, tok, eos_ids(model, tok)).generate(_prompts(tok), greedy)
    assert fast.response_ids == ref.response_ids and fast.finish_reasons == ref.finish_reasons


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.2, 0.9, 0),
                                                     (0.9, 1.0, 4), (0.8, 0.8, 6)])
def test_sampler_logprobs_equal_the_trainers_scoring(micro_policy, kind, temperature, top_p, top_k):
    model, tok = micro_policy
    torch.manual_seed(0)
    engine = make_engine(kind, model, tok, eos_ids(model, tok))
    params = SamplingParams(n=4, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=10)
    batch = engine.generate(_prompts(tok), params)
    packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
    with torch.no_grad():
        trainer = score(model, packed, Dist(temperature, top_p, top_k))[0]
    sampler = packed.spread(batch.logprobs)
    mask = packed.response_mask.bool()
    assert torch.isfinite(trainer[mask]).all()
    assert (trainer - sampler)[mask].abs().max() < 1e-4
    if temperature != 1.0 or top_p < 1 or top_k:  # and scoring the raw logits would be wrong
        with torch.no_grad():
            raw = score(model, packed)[0]
        assert (raw - sampler)[mask].abs().max() > 1e-2


def test_fast_engine_draws_from_the_models_distribution(micro_policy):
    """First tokens of 4,000 samples of one prompt follow the model's filtered next-token law."""
    model, tok = micro_policy
    torch.manual_seed(1)
    prompt = tok("12+3=")["input_ids"]
    params = SamplingParams(n=4000, temperature=0.9, top_p=0.95, max_new_tokens=1)
    batch = make_engine("fast", model, tok, eos_ids(model, tok)).generate([prompt], params)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(filter_logits(logits, 0.9, 0.95), -1)
    first = torch.tensor([r[0] for r in batch.response_ids])
    freq = torch.bincount(first, minlength=probs.numel()).float() / len(first)
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.04  # > 5 standard errors at n = 4000


def test_engines_ignore_a_checkpoints_shipped_generation_defaults(micro_model_dir, tmp_path):
    """A folder shipping repetition_penalty 5, top_k 2 and a minimum length samples from pi alone."""
    import json
    import shutil

    folder = tmp_path / "shipped"
    shutil.copytree(micro_model_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(repetition_penalty=5.0, top_k=2, min_new_tokens=6, no_repeat_ngram_size=2, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    model, tok = load_policy(str(folder), device="cpu")
    assert model.generation_config.repetition_penalty in (None, 1.0)
    for kind in ENGINES:
        torch.manual_seed(0)
        batch = make_engine(kind, model, tok, eos_ids(model, tok)).generate(
            _prompts(tok), SamplingParams(n=6, temperature=1.0, max_new_tokens=8))
        packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
        with torch.no_grad():
            trainer = score(model, packed)[0]
        mask = packed.response_mask.bool()
        assert (trainer - packed.spread(batch.logprobs))[mask].abs().max() < 1e-4, kind


def test_dropout_is_off_after_loading(micro_model_dir, tmp_path):
    """A model configured with dropout computes the same function in train() and eval() mode."""
    import json
    import shutil

    folder = tmp_path / "dropout"
    shutil.copytree(micro_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_dropout"] = 0.5
    (folder / "config.json").write_text(json.dumps(cfg))
    model, tok = load_policy(str(folder), device="cpu")
    ids = torch.tensor([tok("123+456=579")["input_ids"]] * 4)
    model.train()
    train_logits = model(input_ids=ids).logits
    model.eval()
    assert torch.equal(train_logits, model(input_ids=ids).logits)
    assert model.config.attention_dropout == 0.0


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


def _grads(model, packed, **kw):
    model.zero_grad(set_to_none=True)
    logp, ent = score(model, packed, Dist(0.8, 0.9, 0), with_entropy=True, **kw)
    (logp * packed.response_mask).sum().backward()
    return logp.detach(), ent, [p.grad.clone() for p in model.parameters()]


def test_chunked_logprobs_entropy_and_gradients_equal_unchunked(micro_policy):
    model, tok = micro_policy
    torch.manual_seed(0)
    prompts = [list(torch.randint(3, 17, (n,)).tolist()) for n in (4, 7, 5, 3)]
    responses = [list(torch.randint(3, 17, (n,)).tolist()) for n in (9, 2, 6, 11)]
    packed = pack(prompts, responses, tok.pad_token_id)
    logp_a, ent_a, grads_a = _grads(model, packed, chunk_tokens=0)
    logp_b, ent_b, grads_b = _grads(model, packed, chunk_tokens=5)  # 28 tokens -> 6 chunks
    assert torch.allclose(logp_a, logp_b, atol=1e-6) and torch.allclose(ent_a, ent_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_trimmed_micro_batches_score_like_the_full_batch(micro_policy):
    model, tok = micro_policy
    prompts = [[5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13], [4, 5, 6, 7]]
    responses = [[4, 1], [6, 7, 8, 9, 10, 1], [3], [8, 8, 8]]
    packed = pack(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        full = score(model, packed)[0]
        for idx in ([0, 2], [1], [3, 1]):
            micro = packed.rows(torch.tensor(idx))
            assert micro.prompt_ids.shape[1] == max(len(prompts[i]) for i in idx)
            assert micro.response_ids.shape[1] == max(len(responses[i]) for i in idx)
            part = score(model, micro)[0]
            mask = micro.response_mask.bool()
            assert torch.allclose(part[mask], full[idx, :part.shape[1]][mask], atol=1e-5)


def _group_batch(tok, seed=0):
    """Three prompts with three to four responses each, of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for plen, k in ((5, 3), (9, 4), (3, 4)):
        prompt = torch.randint(3, 17, (plen,), generator=g).tolist()
        for _ in range(k):
            n = int(torch.randint(1, 9, (1,), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(3, 17, (n,), generator=g).tolist())
    return pack(prompts, responses, tok.pad_token_id)


@pytest.mark.parametrize("dist", [Dist(0.9, 0.95, 0), Dist(1.0, 1.0, 0), Dist(0.7, 1.0, 0)])
@pytest.mark.parametrize("buckets", ["planned", "one per row"])
def test_shared_prompt_pass_equals_one_full_pass_per_row(micro_policy, monkeypatch, dist, buckets):
    """Reusing a prompt's keys/values for its K rows gives the same log-probs, entropy and gradients,
    however the rows are cut into length buckets (one shared embedding lookup serves them all)."""
    import opo.sequences

    model, tok = micro_policy
    packed = _group_batch(tok)
    assert packed.prompt_ids.shape[0] == 3 and packed.num_rows == 11
    if buckets == "one per row":
        monkeypatch.setattr(opo.sequences, "length_buckets", lambda lengths, overhead=32: [[i] for i in range(len(lengths))])
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        logp, ent = score(model, packed, dist, with_entropy=True, share_prompts=share)
        (logp * packed.response_mask * torch.linspace(-1, 1, packed.num_rows)[:, None]).sum().backward()
        results.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (la, ea, ga), (lb, eb, gb) = results
    assert torch.allclose(la, lb, atol=1e-5) and torch.allclose(ea, eb, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb))


def test_micro_batch_plan_respects_rows_and_token_budget():
    lengths = [5, 40, 12, 12, 33, 7, 40, 1]
    plan = plan_micro_batches(lengths, max_rows=3, max_tokens=80)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert len(mb) <= 3 and len(mb) * max(lengths[i] for i in mb) <= 80
    assert plan_micro_batches(lengths) == [sorted(range(8), key=lambda i: (-lengths[i], i))]
    assert plan_micro_batches([100, 3], max_tokens=10) == [[0], [1]]  # too long: alone


def test_micro_batch_plan_keeps_groups_together_and_counts_shared_prompts():
    lengths = [4, 6, 5, 2, 3, 8, 1, 1]
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    prompts = [10, 10, 10, 3, 3, 20, 20, 20]
    plan = plan_micro_batches(lengths, max_tokens=40, groups=groups, prompt_lengths=prompts)
    assert sorted(i for mb in plan for i in mb) == list(range(8))
    for mb in plan:
        cost = len({groups[i] for i in mb}) * max(prompts[i] for i in mb) + len(mb) * max(lengths[i] for i in mb)
        assert cost <= 40 or len(mb) == 1
    # Group 0 (3 rows of <= 6 tokens after a 10-token prompt: cost 28) fits whole.
    assert any(sorted(mb) == [0, 1, 2] for mb in plan)


def test_length_buckets_cover_every_row_and_cut_padding():
    import itertools

    from opo.sequences import length_buckets

    lengths = [3, 60, 7, 58, 12, 64, 5, 33]
    buckets = length_buckets(lengths, overhead=32)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))

    def cost(bs):
        return sum(len(b) * max(lengths[i] for i in b) + 32 for b in bs)

    # Exhaustive check: no split of the length-sorted rows into consecutive buckets is cheaper.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))])
               for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r))
    assert cost(buckets) == best < len(lengths) * max(lengths) + 32
