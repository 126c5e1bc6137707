"""The reference engine: transformers' own `generate` on the training model.

It shares the trainer's module, so syncing weights is free: only the version moves.
Per-token sampler log-probs come from the processed scores `generate` returns (the
logits after its temperature, top-k and top-p warpers), so they describe exactly the
distribution each token was drawn from. The `fast` engine is quicker; this one is the
yardstick it is tested against.
"""

from __future__ import annotations

import torch

from opo.rollout.base import LocalEngine, RolloutBatch, SamplingParams, cut_at_eos, pad_left, prompt_chunks


class HFEngine(LocalEngine):
    def generation_config(self, params: SamplingParams):
        """A complete config: every field that shapes the distribution is set here, so
        nothing falls back to defaults a checkpoint may ship (repetition penalties,
        min_p, stop strings, suppressed tokens...)."""
        from transformers import GenerationConfig

        greedy = params.temperature <= 0
        return GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=None if greedy else params.top_k,
            min_p=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None,
            repetition_penalty=None, no_repeat_ngram_size=None, encoder_repetition_penalty=None,
            bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
            min_length=None, min_new_tokens=None, stop_strings=None, forced_bos_token_id=None,
            forced_eos_token_id=None, exponential_decay_length_penalty=None,
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            output_scores=True, return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        gen_cfg = self.generation_config(params)
        device = next(self.model.parameters()).device
        eos = set(self.eos_ids)
        rows, groups, responses, reasons, logprobs = [], [], [], [], []
        for part in prompt_chunks(len(prompt_ids), params.n, self.batch_size):
            chunk = [p for p in prompt_ids[part] for _ in range(params.n)]
            ids, mask = pad_left(chunk, self.tokenizer.pad_token_id, device)
            # synced_gpus=False: transformers would turn it on for FSDP-sharded models and then
            # wait for every rank each token; under opo.parallel each rank generates on its own,
            # on the full weights gathered for the phase, so ranks may stop at different times.
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                      synced_gpus=False)
            new = out.sequences[:, ids.shape[1]:]
            if params.temperature > 0:
                # scores[t] [B, V] are the processed logits of step t; log-softmax gives log pi_s.
                steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [B, T, V]
                picked = steps.gather(-1, new[:, :steps.shape[1], None]).squeeze(-1)
            else:
                picked = torch.zeros(new.shape, device=new.device)
            for row, lp in zip(new.tolist(), picked.tolist()):
                response, reason = cut_at_eos(row, eos)
                responses.append(response)
                reasons.append(reason)
                logprobs.append(lp[:len(response)])
            rows += chunk
            groups += [part.start + i // params.n for i in range(len(chunk))]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return RolloutBatch(prompt_ids=rows, response_ids=responses, finish_reasons=reasons,
                            group_ids=groups, policy_version=self.policy_version, texts=texts,
                            logprobs=logprobs)
