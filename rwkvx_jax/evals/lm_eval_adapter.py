"""An lm-evaluation-harness model named `rwkvx`: log-likelihoods, rolling perplexity, generation.

Importing this module registers the model with lm-eval (it is the only module of rwkvx_jax that
needs the `eval` extra, `pip install -e '.[eval]'`):

    import lm_eval
    import rwkvx_jax.evals.lm_eval_adapter  # noqa: F401  (registers "rwkvx")

    results = lm_eval.simple_evaluate(
        model="rwkvx", model_args="checkpoint=rwkvx-0.2b/,max_length=4096",
        tasks=["lambada_openai"], batch_size=8,
    )

or from the shell, with lm-eval's own command line (this module registers the model first):

    python -m rwkvx_jax.evals.lm_eval_adapter run --model rwkvx \\
        --model_args checkpoint=rwkvx-0.2b/ --tasks lambada_openai --batch_size 8

Model arguments: `checkpoint=DIR` (a converted checkpoint) or `demo=true` (the random `tiny`
model), `batch_size`, `max_length` (tokens a request may use; default 2048) and `dtype` (compute
dtype, e.g. bfloat16). Scoring pads each batch to `batch_size` rows and to one of a few fixed
lengths (powers of two from 32, and `max_length`), so each is compiled once; peak memory is about
batch_size * max_length * vocab_size * 4 bytes of logits.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from rwkvx_jax.config import RWKVXConfig
from rwkvx_jax.decoding.decoder import DEFAULT_PREFILL_TOKENS, DecodeConfig, Decoder
from rwkvx_jax.decoding.sampling import SamplingConfig
from rwkvx_jax.model import RWKVX, bare_params
from rwkvx_jax.tokenizer import Tokenizer, tokenizer_for_vocab

MODEL_NAME = "rwkvx"
DEFAULT_MAX_LENGTH = 2048
# lm-eval's usual default when a task gives no `max_gen_toks`.
DEFAULT_MAX_GEN_TOKS = 256
SMALLEST_BUCKET = 32
GENERATION_KEYS = frozenset(
    {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
)

logger = logging.getLogger(__name__)


class ScoredRow(NamedTuple):
    """One sequence to score: the model reads `inputs` and is scored on the last `n_scored`
    of `targets` (inputs shifted by one token)."""

    inputs: list[int]
    targets: list[int]
    n_scored: int


class GenerationSettings(NamedTuple):
    """The generation settings of one request, normalised (hashable, so requests group by it)."""

    until: tuple[str, ...]
    max_gen_toks: int
    sampling: SamplingConfig


def bucket_lengths(max_length: int) -> tuple[int, ...]:
    """The padded lengths a scoring batch may take: powers of two from 32 below `max_length`,
    then `max_length` itself."""
    lengths = []
    length = SMALLEST_BUCKET
    while length < max_length:
        lengths.append(length)
        length *= 2
    return (*lengths, max_length)


@functools.lru_cache(maxsize=8)
def _token_scorer(config: RWKVXConfig):
    """A jitted (params, inputs [B, T], targets [B, T]) -> (log p(target) [B, T] float32,
    target is the argmax [B, T] bool); one compiled version per shape."""
    model = RWKVX(config)

    def score(params, inputs, targets):
        logits = model.apply({"params": params}, inputs)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return target_logprobs, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score)


def _positive_int(name: str, value: Any) -> int:
    """A model argument that must be an int >= 1 (lm-eval may hand it over as a string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"rwkvx model argument {name} must be an int >= 1, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"rwkvx model argument {name} must be true or false, got {value!r}")
    return value


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Moves the context's trailing whitespace to the continuation's front.

    Word tokens carry their leading space (" Paris"), so a context ending in a space would
    otherwise leave a lone space token and score the continuation without its space.
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _first_stop(text: str, until: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any of the `until` strings in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in until if stop) if index >= 0]
    return min(found) if found else None


@register_model(MODEL_NAME)
class RWKVXLM(LM):
    """RWKV-X (or RWKV-7) for lm-eval: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

    Example:
      lm = RWKVXLM(checkpoint="rwkvx-0.2b/", batch_size=8, max_length=4096)
      [(logprob, is_greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("The capital of
          France is", " Paris"), 0)])
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        demo: bool | str = False,
        batch_size: int | str = 1,
        max_length: int | str = DEFAULT_MAX_LENGTH,
        dtype: str | None = None,
        *,
        config: RWKVXConfig | None = None,
        params=None,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        """Loads the model (the lm-eval model arguments are the first five).

        Args:
          checkpoint: a directory written by `convert_torch.py` (`rwkvx_jax.load`).
          demo: use the random `tiny` model of `python -m rwkvx_jax.generate --demo`.
          batch_size: sequences scored or generated together.
          max_length: most tokens a scored sequence reads (longer contexts lose their start;
            rolling log-likelihoods use windows of this length); a generation's context and
            new tokens together stay within it.
          dtype: compute dtype ("float32", "bfloat16", "float16"); None keeps the config's.
          config, params: a model already in memory instead of `checkpoint` / `demo`.
          tokenizer: None picks the one for the model's vocabulary (`tokenizer_for_vocab`).
          max_batch_size: accepted for lm-eval's interface; unused (no automatic batch size).
          device: accepted for lm-eval's interface; JAX places the model on its default
            device (choose it with JAX_PLATFORMS / CUDA_VISIBLE_DEVICES).

        Raises:
          ValueError: not exactly one model source, or an unusable argument (named).
        """
        super().__init__()
        del max_batch_size
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_length = _positive_int("max_length", max_length)
        if self._max_length < 2:
            raise ValueError(f"rwkvx model argument max_length must be >= 2, got {max_length}")
        sources = [checkpoint is not None, _flag("demo", demo), config is not None]
        if sum(sources) != 1:
            raise ValueError(
                "rwkvx needs exactly one model: model_args checkpoint=DIR or demo=true "
                f"(got checkpoint={checkpoint!r}, demo={demo!r}"
                f"{', and a config object' if config is not None else ''})"
            )
        if config is not None and params is None:
            raise ValueError("rwkvx: config was given without params")
        if device is not None:
            logger.info("rwkvx: device=%r is ignored; JAX uses %s", device, jax.devices()[0])
        if checkpoint is not None:
            from rwkvx_jax.api import load

            config, params = load(checkpoint)
        elif config is None:
            from rwkvx_jax.checkpoints.random_weights import demo_model

            config, params = demo_model()
        params = bare_params(params)
        if dtype is not None:
            config = config.replace(dtype=dtype)
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokenizer = tokenizer or tokenizer_for_vocab(config.vocab_size)
        self.buckets = bucket_lengths(self._max_length)
        self._decoder: Decoder | None = None

    # -- properties lm-eval and callers read ------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        """The end-of-document id: the first token's context, and a generation stop token."""
        return self.tokenizer.end_of_document

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    @property
    def decoder(self) -> Decoder:
        """The decoder used by `generate_until` (built on first use), with a KV cache holding
        `max_length` tokens, so generation within it reproduces the parallel forward."""
        if self._decoder is None:
            chunk = self.config.chunk_size
            chunks = math.ceil(self._max_length / chunk)
            cache_chunks = max(chunks + 1, self.config.top_k, 2)
            piece_chunks = min(chunks, max(1, DEFAULT_PREFILL_TOKENS // chunk))
            self._decoder = Decoder(
                self.config,
                self.params,
                DecodeConfig(cache_size=cache_chunks * chunk, prefill_chunk=piece_chunks * chunk),
            )
        return self._decoder

    # -- scoring ----------------------------------------------------------------------------

    def _row(self, context: list[int], continuation: list[int], where: str) -> ScoredRow:
        """The row scoring `continuation` after `context`, keeping the last max_length + 1
        tokens (the context loses its start; the continuation must fit whole)."""
        if not continuation:
            raise ValueError(f"rwkvx: {where} has an empty continuation (nothing to score)")
        if len(continuation) > self._max_length:
            raise ValueError(
                f"rwkvx: {where} has a continuation of {len(continuation)} tokens, more than "
                f"max_length={self._max_length}; raise max_length"
            )
        tokens = (context + continuation)[-(self._max_length + 1) :]
        return ScoredRow(tokens[:-1], tokens[1:], len(continuation))

    def _bucket(self, length: int) -> int:
        return next(bucket for bucket in self.buckets if bucket >= length)

    def _score_rows(
        self, rows: Sequence[ScoredRow], *, disable_tqdm: bool = False, desc: str = "rwkvx"
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each row's scored targets, all of them greedy).

        Rows are scored longest first, `batch_size` at a time; each batch is right-padded to its
        bucket length and to `batch_size` rows. Padding lies after every real token and the
        model is causal, so it changes nothing.
        """
        scorer = _token_scorer(self.config)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        starts = range(0, len(order), self._batch_size)
        for start in tqdm(starts, desc=desc, disable=disable_tqdm or not order):
            batch = order[start : start + self._batch_size]
            width = self._bucket(len(rows[batch[0]].inputs))
            inputs = np.zeros((self._batch_size, width), np.int32)
            targets = np.zeros((self._batch_size, width), np.int32)
            for slot, index in enumerate(batch):
                row = rows[index]
                inputs[slot, : len(row.inputs)] = row.inputs
                targets[slot, : len(row.targets)] = row.targets
            logprobs, greedy = jax.device_get(scorer(self.params, inputs, targets))
            for slot, index in enumerate(batch):
                row = rows[index]
                scored = slice(len(row.targets) - row.n_scored, len(row.targets))
                total = float(np.sum(logprobs[slot, scored], dtype=np.float64))
                results[index] = (total, bool(np.all(greedy[slot, scored])))
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) request: the context's trailing whitespace is
        moved to the continuation, and an empty context becomes the end-of-document token."""
        context, continuation = _split_trailing_space(context, continuation)
        context_ids = self.tokenizer.encode(context) if context else [self.eot_token_id]
        return context_ids, self.tokenizer.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding would produce it.

        Args:
          requests: `Instance`s whose args are (context, continuation) strings.
          disable_tqdm: hide the progress bar.

        Returns:
          (sum of the continuation tokens' log-probabilities, every continuation token is the
          argmax) per request, in order.
        """
        rows = []
        for number, request in enumerate(requests):
            context, continuation = request.args
            rows.append(self._row(*self.encode_pair(context, continuation), f"request {number}"))
        results = self._score_rows(rows, disable_tqdm=disable_tqdm, desc="rwkvx loglikelihood")
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, each read from the end-of-document token.

        Texts longer than `max_length` are cut into windows that each predict new tokens from
        up to `max_length` tokens of context (lm-eval's disjoint rolling windows); windows of
        all texts are scored together, so memory stays bounded by batch_size * max_length.

        Args:
          requests: `Instance`s whose args are (text,).
          disable_tqdm: hide the progress bar.

        Returns:
          The total log-probability of each text (0.0 for an empty one), in order.
        """
        rows, owners = [], []
        for number, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tokenizer.encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                rows.append(self._row(context, continuation, f"request {number}"))
                owners.append(number)
        scores = self._score_rows(rows, disable_tqdm=disable_tqdm, desc="rwkvx rolling")
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> GenerationSettings:
        """Normalises a request's lm-eval generation arguments.

        `max_gen_toks` defaults to 256 (half of max_length if that is less), and must leave room
        for a context within max_length. Greedy (argmax, no penalties) unless `do_sample` is
        true, or `do_sample` is absent and `temperature` > 0; then temperature / top_p / top_k
        sampling. The end-of-document token always stops a sequence.

        Raises:
          ValueError: an argument this model does not implement, or an unusable value.
        """
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
        if unknown:
            raise ValueError(
                f"rwkvx generate_until does not implement {unknown}; "
                f"it takes {sorted(GENERATION_KEYS)}"
            )
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"rwkvx: until must be a string or a list of strings, got {until!r}")
        default_gen_toks = min(DEFAULT_MAX_GEN_TOKS, self._max_length // 2)
        max_gen_toks = _positive_int(
            "max_gen_toks", gen_kwargs.get("max_gen_toks", default_gen_toks)
        )
        if max_gen_toks >= self._max_length:
            raise ValueError(
                f"rwkvx: max_gen_toks={max_gen_toks} leaves no room for a context within "
                f"max_length={self._max_length}"
            )
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is None:
            do_sample = float(gen_kwargs.get("temperature", 0.0)) > 0
        stop = (self.eot_token_id,)
        if not do_sample:
            sampling = SamplingConfig(
                temperature=0.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                stop_tokens=stop,
            )  # fmt: skip
        else:
            temperature = float(gen_kwargs.get("temperature", 1.0))
            if temperature <= 0:
                raise ValueError(f"rwkvx: do_sample=True needs temperature > 0, got {temperature}")
            sampling = SamplingConfig(
                temperature=temperature,
                top_p=float(gen_kwargs.get("top_p", 1.0)),
                top_k=int(gen_kwargs.get("top_k", 0)),
                presence_penalty=0.0,
                frequency_penalty=0.0,
                stop_tokens=stop,
                seed=int(gen_kwargs.get("seed", 0)),
            )
        return GenerationSettings(until, max_gen_toks, sampling)

    def _generate_batch(self, prompts: list[list[int]], settings: GenerationSettings) -> list[str]:
        """Generates from up to batch_size prompts (padded to batch_size rows with copies of the
        first, so the decoder compiles once); a row ends at a stop token or `until` string."""
        n_real = len(prompts)
        padded = prompts + [prompts[0]] * (self._batch_size - n_real)
        streams = [self.tokenizer.streaming_decoder() for _ in range(n_real)]
        texts = [""] * n_real
        running = [True] * n_real
        steps = self.decoder.generate(padded, settings.sampling, settings.max_gen_toks)
        for tokens in steps:
            for row in range(n_real):
                if not running[row]:
                    continue
                if tokens[row] < 0:
                    running[row] = False
                    continue
                texts[row] += streams[row].push(int(tokens[row]))
                running[row] = _first_stop(texts[row], settings.until) is None
            if not any(running):
                steps.close()
                break
        results = []
        for text, stream in zip(texts, streams, strict=True):
            text += stream.flush()
            cut = _first_stop(text, settings.until)
            results.append(text if cut is None else text[:cut])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continues each context until an `until` string, the end-of-document token or
        `max_gen_toks` new tokens; the text returned stops before the `until` string.

        Args:
          requests: `Instance`s whose args are (context, gen_kwargs); see
            `generation_settings` for the gen_kwargs understood.
          disable_tqdm: hide the progress bar.

        Returns:
          The generated text of each request, in order.
        """
        groups: dict[GenerationSettings, list[int]] = {}
        prompts = []
        for number, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = self.generation_settings(dict(gen_kwargs or {}))
            groups.setdefault(settings, []).append(number)
            room = self._max_length - settings.max_gen_toks
            ids = self.tokenizer.encode(context) if context else []
            prompts.append(ids[-room:] if ids else [self.eot_token_id])
        results: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="rwkvx generate", disable=disable_tqdm)
        for settings, members in groups.items():
            members = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self._batch_size):
                batch = members[start : start + self._batch_size]
                texts = self._generate_batch([prompts[i] for i in batch], settings)
                for index, text in zip(batch, texts, strict=True):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results


def main(argv: Iterable[str] | None = None) -> None:
    """lm-eval's command line, with the `rwkvx` model registered (this module's import)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
