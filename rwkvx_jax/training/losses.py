"""Training losses: token cross-entropy, the L2Wrap logit regulariser and LongCE weighting."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# L2Wrap's gradient coefficient before division by the number of positions (SPEC §7).
L2WRAP_COEFFICIENT = 1e-4

PerTokenLossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def token_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Per-token cross-entropy, computed in fp32 via a stable logsumexp.

    Args:
      logits: [B, T, V], any float dtype (upcast to fp32).
      targets: [B, T] integer token ids in [0, V).

    Returns:
      [B, T] fp32, -log softmax(logits)[targets].
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"token_cross_entropy: logits {logits.shape} must be targets {targets.shape} + [V]"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"token_cross_entropy: targets must be integer, got {targets.dtype}")
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def mean_cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Mean token cross-entropy over all positions, or over the masked ones.

    Args:
      logits: [B, T, V].
      targets: [B, T] integer token ids.
      mask: optional [B, T] bool or float weights; the result is sum(mask * loss) / sum(mask),
        and 0 when the mask is all zero.

    Returns:
      Scalar fp32.
    """
    losses = token_cross_entropy(logits, targets)
    if mask is None:
        return jnp.mean(losses)
    return masked_mean(losses, mask)


def masked_mean(losses: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """sum(mask * losses) / sum(mask): the mean over the masked positions, 0 when none is.

    Fine-tuning on chat records scores the answers only (`rwkvx_jax.data.chat`): the mean is
    over the scored tokens of the whole batch, so every scored token weighs the same however
    the answers are spread over the rows.

    Args:
      losses: [B, T] per-token losses.
      mask: [B, T] bool or float weights.

    Returns:
      Scalar fp32.
    """
    if mask.shape != losses.shape:
        raise ValueError(f"masked_mean: mask {mask.shape} must match the losses {losses.shape}")
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    total = jnp.sum(losses.astype(jnp.float32) * mask)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def l2wrap(loss: jnp.ndarray, logits: jnp.ndarray, positions: int | None = None) -> jnp.ndarray:
    """Returns `loss` unchanged; its backward pass pushes the largest logits towards zero.

    The backward pass (RWKV-LM's L2Wrap, SPEC §7) returns the loss's cotangent unchanged and, as
    the logits' cotangent, `1e-4 / (B*T) * max_logit` at each position's arg-max logit and zero
    elsewhere; JAX adds this to whatever gradient the logits get through `loss`. As in the
    official code the added term does not depend on the loss's cotangent: scaling the loss (a
    LongCE weight, 1 / accumulation steps) does not scale it. On ties the first maximal index
    (lowest vocabulary id) receives the term, as `jnp.argmax` picks it.

    Args:
      loss: the loss value, any shape (usually a scalar; [B, T] per-token losses also work).
      logits: [B, T, V], the logits the loss was computed from. Any [..., V] works, with the
        product of the leading dims in place of B*T.
      positions: static; the B*T of the division when `logits` holds only a piece of the
        positions (`chunked_token_cross_entropy` passes the whole sequence's count). None: the
        positions in `logits`.

    Returns:
      `loss`, unchanged.
    """
    del logits, positions
    return loss


def _l2wrap_fwd(loss, logits, positions):
    return loss, logits


def _l2wrap_bwd(positions, logits, loss_cotangent):
    if positions is None:
        positions = logits.size // logits.shape[-1]
    factor = L2WRAP_COEFFICIENT / positions
    max_index = jnp.argmax(logits, axis=-1)
    max_logit = jnp.max(logits, axis=-1).astype(jnp.float32)
    at_max = jnp.arange(logits.shape[-1]) == max_index[..., None]
    logits_cotangent = jnp.where(at_max, (max_logit * factor)[..., None], 0.0)
    return loss_cotangent, logits_cotangent.astype(logits.dtype)


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def chunked_token_cross_entropy(
    hidden: jnp.ndarray,
    targets: jnp.ndarray,
    logits_fn: Callable[[jnp.ndarray], jnp.ndarray],
    *,
    chunk_tokens: int = 1024,
    l2wrap_logits: bool = False,
) -> jnp.ndarray:
    """`token_cross_entropy(logits_fn(hidden), targets)` without ever holding [B, T, V] logits.

    The logits of a long sequence dwarf the model: at T = 64000 and V = 65536 one fp32 copy is
    16.8 GB per sequence, and the loss's backward pass keeps several. Here the positions are
    cut into pieces of `chunk_tokens` along T. A scan makes each piece's logits, its losses and
    (with `l2wrap_logits`) its L2Wrap term, and drops the logits; the backward pass remakes
    them piece by piece (`jax.checkpoint`). So memory holds one piece's logits, at the cost of
    running `logits_fn` twice. Each position's loss and gradient are those of the unchunked
    expression: pieces never mix positions. `chunk_tokens=0` computes that expression directly
    (whole logits, `logits_fn` once), for when [B, T, V] fits.

    Args:
      hidden: [B, T, C] final hidden states (anything `logits_fn` reads).
      targets: [B, T] integer token ids in [0, V).
      logits_fn: [B, t, C] -> [B, t, V] logits, applied piece by piece; it may close over
        parameters (their gradients add up over the pieces).
      chunk_tokens: positions per piece; the last piece holds the T % chunk_tokens left over.
        0: one piece, the whole T, without recomputation.
      l2wrap_logits: also give the logits L2Wrap's gradient term (`l2wrap`), divided by the
        whole B*T as if the logits were one array.

    Returns:
      [B, T] fp32 per-token losses.
    """
    if hidden.ndim != 3 or hidden.shape[:2] != targets.shape:
        raise ValueError(
            f"chunked_token_cross_entropy: hidden {hidden.shape} must be targets "
            f"{targets.shape} + [C]"
        )
    if chunk_tokens < 0:
        raise ValueError(
            f"chunked_token_cross_entropy: chunk_tokens must be >= 0 (0: whole logits), got "
            f"{chunk_tokens}"
        )
    batch, length = targets.shape
    positions = batch * length

    def losses_of(piece_hidden, piece_targets):
        logits = logits_fn(piece_hidden)
        losses = token_cross_entropy(logits, piece_targets)
        return l2wrap(losses, logits, positions) if l2wrap_logits else losses

    if chunk_tokens == 0:
        return losses_of(hidden, targets)
    piece_losses = jax.checkpoint(losses_of)
    num_full, tail = divmod(length, chunk_tokens)
    pieces = []
    if num_full:
        cut = num_full * chunk_tokens
        # [B, n, t, ...] -> [n, B, t, ...]: the scan walks T; each piece keeps the batch axis
        # (and its sharding) in front.
        split = lambda x: jnp.swapaxes(
            x[:, :cut].reshape(batch, num_full, chunk_tokens, *x.shape[2:]), 0, 1
        )
        _, full = jax.lax.scan(
            lambda carry, xs: (carry, piece_losses(*xs)), None, (split(hidden), split(targets))
        )
        pieces.append(jnp.swapaxes(full, 0, 1).reshape(batch, cut))
    if tail:
        pieces.append(piece_losses(hidden[:, length - tail :], targets[:, length - tail :]))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def longce_weights(
    loss_full: jnp.ndarray,
    loss_short: jnp.ndarray,
    *,
    start: int = 8000,
    cap: float = 10.0,
) -> jnp.ndarray:
    """LongCE token weights, min(exp(loss_short - loss_full), cap), without gradient.

    A token that is much easier to predict with the full context than with a short one gets a
    large weight (SPEC §7). Positions before `start` weigh 1.

    Args:
      loss_full: [B, T] per-token loss with the full context.
      loss_short: [B, T] per-token loss with a short context (see `short_context_loss`); its
        values before `start` are ignored.
      start: first position that is reweighted.
      cap: upper bound on a weight, > 0.

    Returns:
      [B, T] fp32 weights, gradient-free.
    """
    if loss_full.shape != loss_short.shape or loss_full.ndim != 2:
        raise ValueError(
            f"longce_weights: loss_full {loss_full.shape} and loss_short {loss_short.shape} "
            "must both be [B, T]"
        )
    if start < 0 or cap <= 0:
        raise ValueError(f"longce_weights: need start >= 0 and cap > 0, got {start=}, {cap=}")
    loss_full = jax.lax.stop_gradient(loss_full.astype(jnp.float32))
    loss_short = jax.lax.stop_gradient(loss_short.astype(jnp.float32))
    weights = jnp.minimum(jnp.exp(loss_short - loss_full), cap)
    reweighted = jnp.arange(loss_full.shape[1]) >= start
    return jnp.where(reweighted, weights, 1.0)


def _check_longce_geometry(window: int, stride: int, start: int) -> None:
    if window < 1 or stride < 1 or start < window:
        raise ValueError(
            f"LongCE needs window >= 1, stride >= 1 and start >= window, "
            f"got {window=}, {stride=}, {start=}"
        )


def short_context_loss(
    per_token_loss_fn: PerTokenLossFn,
    tokens: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    window: int = 4000,
    stride: int = 4000,
    start: int = 8000,
) -> jnp.ndarray:
    """Per-token loss with a truncated context, for LongCE; no gradient flows through it.

    Exact rule. Positions from `start` on are cut into segments of `stride` positions,
    [a, a + stride) with a = start + i * stride (the last one may be shorter, ending at T). For
    each segment, `per_token_loss_fn` is run on tokens[:, a - window : a + stride] (and the same
    slice of targets), and its outputs for the segment's positions are kept. So the token at
    position t >= start is read after exactly window + (t - start) % stride earlier tokens,
    between `window` and `window + stride - 1` (4000..7999 with the defaults), and the loss of
    predicting targets[:, t] conditions on that many tokens plus tokens[:, t] itself. Positions
    before `start` are not computed and hold 0. With start = window + stride (the default) every
    position before `start` would have seen its whole prefix anyway, so weight 1 loses nothing.

    Full-length segments run one at a time (`lax.map`), each a batch of B sequences of
    window + stride tokens, so memory stays that of one such call; a shorter tail segment is one
    more call.

    Args:
      per_token_loss_fn: (tokens [B, L], targets [B, L]) -> [B, L] per-token loss, causal, with
        a fresh state on every call (e.g. a model forward + `token_cross_entropy`).
      tokens: [B, T] input token ids.
      targets: [B, T] next-token ids.
      window: minimum number of earlier tokens a scored position sees.
      stride: segment length; a position sees at most window + stride - 1 earlier tokens.
      start: first scored position, >= window.

    Returns:
      [B, T] fp32, zero before `start`.
    """
    _check_longce_geometry(window, stride, start)
    if tokens.shape != targets.shape or tokens.ndim != 2:
        raise ValueError(
            f"short_context_loss: tokens {tokens.shape} and targets {targets.shape} "
            "must both be [B, T]"
        )
    batch, length = tokens.shape
    pieces = [jnp.zeros((batch, min(start, length)), jnp.float32)]
    num_full, tail = divmod(max(length - start, 0), stride)

    def segment_loss(segment_start: jnp.ndarray) -> jnp.ndarray:
        first = segment_start - window
        seg_tokens = jax.lax.dynamic_slice_in_dim(tokens, first, window + stride, axis=1)
        seg_targets = jax.lax.dynamic_slice_in_dim(targets, first, window + stride, axis=1)
        losses = per_token_loss_fn(seg_tokens, seg_targets)[:, window:]
        return jax.lax.stop_gradient(losses.astype(jnp.float32))

    if num_full:
        segment_starts = start + stride * jnp.arange(num_full)
        full = jax.lax.map(segment_loss, segment_starts)  # [num_full, B, stride]
        pieces.append(jnp.moveaxis(full, 0, 1).reshape(batch, num_full * stride))
    if tail:
        first = start + num_full * stride - window
        losses = per_token_loss_fn(tokens[:, first:], targets[:, first:])[:, window:]
        pieces.append(losses.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.concatenate(pieces, axis=1))


def longce_loss(
    per_token_loss_fn: PerTokenLossFn,
    tokens: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    window: int = 4000,
    stride: int = 4000,
    start: int = 8000,
    cap: float = 10.0,
) -> jnp.ndarray:
    """LongCE loss: mean(weight * loss_full), weights from `longce_weights` (SPEC §7).

    Gradients flow only through the full-context loss. To use L2Wrap as well, apply it inside
    `per_token_loss_fn` (`l2wrap(token_cross_entropy(logits, targets), logits)`); the
    short-context passes carry no gradient, so it acts on the full pass only.

    Args:
      per_token_loss_fn: (tokens [B, L], targets [B, L]) -> [B, L] per-token loss.
      tokens: [B, T] input token ids.
      targets: [B, T] next-token ids.
      window, stride, start: the short-context rule of `short_context_loss`.
      cap: upper bound on a weight.

    Returns:
      Scalar fp32.
    """
    loss_full = per_token_loss_fn(tokens, targets).astype(jnp.float32)
    loss_short = short_context_loss(
        per_token_loss_fn, tokens, targets, window=window, stride=stride, start=start
    )
    weights = longce_weights(loss_full, loss_short, start=start, cap=cap)
    return jnp.mean(weights * loss_full)
