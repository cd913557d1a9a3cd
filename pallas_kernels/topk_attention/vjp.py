"""The custom VJP every top-k attention backend shares: (o, lse) out, FlashAttention-2 backward."""

from __future__ import annotations

import functools

import jax


def attention_vjp(forward, backward):
    """Differentiable attention(q, k, v, sel, plan) -> (o, lse) from a forward and a backward.

    The backward recomputes probabilities from the saved log-sum-exp, FlashAttention-2 style,
    and gets delta = rowsum(o * do) - dlse: d lse / d logits = p, so a cotangent on lse only
    shifts delta. The selection `sel` is integer and gets no cotangent; `plan` is static.

    Args:
      forward: forward(q, k, v, sel, plan) -> (o, lse, saved): the output and its log-sum-exp
        (fp32, one per query row), and whatever else the backward needs (the pair tiles, and
        sel if it uses it).
      backward: backward(plan, (q, k, v, o, lse, saved), do, delta) -> (dq, dk, dv), with do
        the cotangent of o and delta fp32, shaped like lse.

    Returns:
      attention(q, k, v, sel, plan) -> (o, lse), differentiable in q, k, v.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attention(q, k, v, sel, plan):
        o, lse, _ = forward(q, k, v, sel, plan)
        return o, lse

    def attention_fwd(q, k, v, sel, plan):
        o, lse, saved = forward(q, k, v, sel, plan)
        return (o, lse), (q, k, v, o, lse, saved)

    def attention_bwd(plan, residuals, cotangents):
        o = residuals[3]
        do, dlse = cotangents
        delta = (o * do).sum(axis=-1) - dlse
        dq, dk, dv = backward(plan, residuals, do, delta)
        return dq, dk, dv, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
