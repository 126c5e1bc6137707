"""On-policy distillation: a teacher's per-token signal inside the same exact on-policy loop.

The student samples its own responses (as in RL); a frozen teacher scores every sampled
token. With s_t = log π_student(y_t | ·) and q_t = log π_teacher(y_t | ·), both under the
sampling distribution (the same temperature and top-p/top-k), the per-token advantage

    A_t = coef · (q_t − s_t)

is the reverse-KL signal: its expectation over the student's own samples is
−coef · KL(π_student ‖ π_teacher) per token, so following it lowers that KL (GKD with
the reverse divergence; on-policy distillation). It is detached, like every advantage,
and it adds to any estimator's sequence advantage:

    A_t = reward_coef · A_seq + distill_coef · (q_t − s_t).

Pure tensor functions; opo.update calls them per micro-batch, where both log-probs exist.
"""

from __future__ import annotations

from torch import Tensor


def reverse_kl_advantage(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor,
                         coef: float = 1.0) -> Tensor:
    """coef · (teacher − student) per token, detached, 0 where mask is 0.

    student_logp, teacher_logp, mask: [B, T] → [B, T] (float32 or wider)."""
    if student_logp.shape != teacher_logp.shape or mask.shape != student_logp.shape:
        raise ValueError(f"need three [B,T] tensors of one shape, got {tuple(student_logp.shape)}, "
                         f"{tuple(teacher_logp.shape)} and {tuple(mask.shape)}")
    gap = teacher_logp.detach().float() - student_logp.detach().float()
    return coef * gap * mask.float()


def token_advantages(sequence_advantages: Tensor, distill_advantages: Tensor | None,
                     reward_coef: float = 1.0) -> Tensor:
    """reward_coef · A_seq broadcast over tokens, plus the distillation term when given.

    sequence_advantages [B], distill_advantages [B, T] or None → [B] (no teacher) or [B, T]."""
    if distill_advantages is None:
        return sequence_advantages * reward_coef
    seq = sequence_advantages.to(distill_advantages.dtype).unsqueeze(-1)
    return reward_coef * seq + distill_advantages


def reverse_kl_sum(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor) -> float:
    """Σ over response tokens of (s_t − q_t): with samples from the student, its mean per
    token estimates KL(π_student ‖ π_teacher) (the k1 estimator; unbiased, may be < 0 per
    batch). Returns the sum; the caller divides by the batch's tokens over all ranks."""
    return float(((student_logp.detach().float() - teacher_logp.detach().float()) * mask.float()).sum())


def same_tokenizer(student, teacher) -> str | None:
    """None when the two tokenizers map every text to the same ids; else why not.

    Compared: the vocabulary (token → id) and the pad/eos/bos ids. A teacher scores the
    student's token ids as they are, so any difference would score other text."""
    a, b = student.get_vocab(), teacher.get_vocab()
    if a != b:
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        moved = sum(1 for t in set(a) & set(b) if a[t] != b[t])
        return (f"the vocabularies differ ({len(a)} and {len(b)} tokens; {only_a} only in the "
                f"student's, {only_b} only in the teacher's, {moved} with another id)")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            return f"{name} differs ({getattr(student, name, None)} and {getattr(teacher, name, None)})"
    return None


__all__ = ["reverse_kl_advantage", "token_advantages", "reverse_kl_sum", "same_tokenizer"]
