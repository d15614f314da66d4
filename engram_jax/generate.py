"""Autoregressive generation with a KV cache: jitted prefill + fixed-shape incremental decode.

Decoding runs the model's own code: ``EngramLM.embed_tokens``, ``Block.step`` (the same
sublayers as ``Block.__call__``; attention writes its keys/values into a fixed ``[B, S, ...]``
buffer at the current position and attends to slots ``<= pos + t``, RoPE at absolute
positions) and ``EngramLM.readout``.

Engram keeps its own decode state (ENGRAM_SPEC sections 2-3, 8):
- on the host, the last N-1 *compressed* ids of each sequence: the hash ids of a new token
  come from ``NgramHasher`` applied to that window (positions before the start read the pad
  id, exactly as in the full-sequence hash);
- on the device, the short conv's history (``Engram.init_cache`` / ``Engram.step``).

Each forward step runs as two jitted halves: ``pre`` (embedding and the blocks before the first
Engram layer: needs only the token) and ``post`` (the remaining blocks, readout, sampling:
needs the Engram rows). Rows always enter ``post`` pre-gathered, from a :class:`DeviceRows`
(tables resident on the device) or an ``engram_jax.offload.HostRows`` (tables in host
memory), so the two placements run the very same compiled ``post`` and agree exactly. The
decode loop dispatches ``pre`` for the next token before it hashes and gathers on the host,
so the lookup overlaps the first blocks (ENGRAM_SPEC section 8).

Decode steps have fixed shapes (one token, cache of ``max_len``): one compilation for all
tokens. Prompts run in power-of-two chunks, so every prompt length reuses a few programs.
Cached decoding equals a full forward pass for dropless MoE dispatch ("ragged", "blocked");
with "capacity" a full batch may drop tokens that a one-token step keeps.

Shape legend: B batch, T positions in this step, S cache length, M mHC branches, D d_model,
N query heads, K kv heads, h head dim, r rope dim, V vocabulary, H hash heads, d row width.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.engram import TableParam
from engram_jax.tokenizer import CompressionTable


def init_cache(model, batch: int, max_len: int) -> dict:
    """Zero decode state ``{layer: {"kv": {"k", "v"}, "conv": history (Engram layers)}}``."""
    return {i: block.init_cache(batch, max_len) for i, block in enumerate(model.blocks)}


def sample(logits_BxV, key, temperature, top_k):
    """Greedy argmax when ``temperature <= 0``, else top-k (``top_k <= 0``: all) sampling at
    ``temperature``: -> int32 [B]. Every argument may be traced (no recompilation); a greedy
    step skips the sort and the random draws (``lax.cond``: on CPU they cost more than the
    rest of a small model's step)."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    draw = functools.partial(_draw, logits_BxV, key, temperature, top_k)
    return jax.lax.cond(temperature > 0, draw, lambda: greedy_B)


def _draw(logits_BxV, key, temperature, top_k):
    v = logits_BxV.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth_Bx1 = jnp.take(jnp.sort(logits_BxV, axis=-1), v - k, axis=-1)[:, None]
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    scaled_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
    return jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The two jitted halves of a step


def _pre(graphdef, state, tokens_BxT, cache: dict, pos, *, stop: int):
    model = nnx.merge(graphdef, *state)
    h_BxTxMxD = model.embed_tokens(tokens_BxT)
    new = {}
    for i in range(stop):
        h_BxTxMxD, new[i], _ = model.blocks[i].step(h_BxTxMxD, cache[i], pos)
    return h_BxTxMxD, new


def _post(
    graphdef, state, h_BxTxMxD, cache: dict, pos, rows: dict, key, temperature, top_k, *, start: int
):
    model = nnx.merge(graphdef, *state)
    new, gates = {}, {}
    for i in range(start, len(model.blocks)):
        h_BxTxMxD, new[i], g = model.blocks[i].step(h_BxTxMxD, cache[i], pos, rows.get(i))
        if g is not None:
            gates[i] = g
    logits_BxTxV = model.readout(h_BxTxMxD)
    token_B = sample_at(logits_BxTxV[:, -1], key, pos, temperature, top_k)
    return logits_BxTxV, token_B, new, gates


def sample_at(logits_BxV, key, pos, temperature, top_k):
    """:func:`sample` with the key folded with the position: one draw for the batch at a
    scalar ``pos``; at per-sequence positions ``pos [B]`` each row draws as if decoded alone."""
    if jnp.ndim(pos) == 0:
        return sample(logits_BxV, jax.random.fold_in(key, pos), temperature, top_k)

    def one(logits_V, pos_b):  # under vmap a cond runs both branches: keep it outside
        return _draw(logits_V[None], jax.random.fold_in(key, pos_b), temperature, top_k)[0]

    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, lambda: jax.vmap(one)(logits_BxV, pos), lambda: greedy_B)


@functools.lru_cache(maxsize=32)
def programs(graphdef, first: int):
    """The jitted ``pre``/``post`` of a model structure, shared by its Generators. The graphdef
    is closed over, not a static argument: hashing it on every call costs milliseconds."""
    pre = jax.jit(functools.partial(_pre, graphdef, stop=first), donate_argnums=(2,))
    post = jax.jit(functools.partial(_post, graphdef, start=first), donate_argnums=(2,))
    return pre, post


def _placeholder_tables(tables: nnx.State) -> nnx.State:
    """Empty stand-ins: ``post`` only ever sees pre-gathered rows, so tables stay out of it."""
    return jax.tree.map(lambda x: jnp.zeros((0,) + x.shape[1:], x.dtype), tables)


# ---------------------------------------------------------------------------------------------
# Row sources: {layer: global row ids [B,T,H] (host int)} -> {layer: rows [B,T,H,d] on device}


class DeviceRows:
    """Tables resident in device memory: rows gathered by a jitted ``take``."""

    def __init__(self, model):
        self.tables = {i: model.blocks[i].engram.table.table[...] for i in model.engram_layers}
        self._take = jax.jit(lambda t, g: {i: jnp.take(t[i], g[i], axis=0) for i in g})

    def __call__(self, gids: dict) -> dict:
        return self._take(self.tables, {i: np.asarray(g, np.int32) for i, g in gids.items()})


@dataclasses.dataclass
class GenerateResult:
    tokens: np.ndarray  # [B, n] generated ids (after the prompt)
    prompt_len: int
    steps: int
    prefill_seconds: float = 0.0  # until the first new token is on the host
    decode_seconds: float = 0.0  # the remaining steps - 1 tokens
    decode_cpu_seconds: float = 0.0  # CPU time of this process (all threads) for those


class Generator:
    """Prefill + cached decode of an :class:`~engram_jax.model.EngramLM`.

    ``Generator(model, compression, max_len=512, batch=1, rows=None)``: ``rows`` is a row
    source (default :class:`DeviceRows`; ``engram_jax.offload.HostRows`` keeps tables on the
    host). Stateful: :meth:`prefill` starts sequences, :meth:`feed` extends them by given
    tokens, :meth:`generate` samples. All sequences of a batch have the same length. Prompts
    run in power-of-two chunks of at most ``max_chunk`` tokens, so the programs compiled for
    any prompt are among a few shapes (1, 2, 4, ..., max_chunk tokens). ``overlap=False``
    fetches the rows before dispatching the first blocks (for measuring the overlap).
    """

    def __init__(
        self,
        model,
        compression: CompressionTable,
        *,
        max_len: int = 512,
        batch: int = 1,
        rows: Callable[[dict], dict] | None = None,
        max_chunk: int = 256,
        overlap: bool = True,
    ):
        cfg = self.cfg = model.cfg
        self.model, self.compression = model, compression
        self.batch, self.max_len, self.max_chunk = int(batch), int(max_len), int(max_chunk)
        self.overlap = overlap
        self.layers = model.engram_layers
        self.first = min(self.layers, default=len(model.blocks))
        self.offsets = {
            i: np.asarray(model.blocks[i].engram.table.offsets, np.int64) for i in self.layers
        }
        self.n_hist = cfg.engram.max_ngram_size - 1
        self.hasher = None
        if self.layers:
            self.hasher = compression.hasher(cfg.engram)
        self.rows = rows if rows is not None else (DeviceRows(model) if self.layers else None)
        graphdef, tables, rest = nnx.split(model, TableParam, ...)
        self._state = (_placeholder_tables(tables), rest)
        self._pre, self._post = programs(graphdef, self.first)
        self.reset()

    # -- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        cache = init_cache(self.model, self.batch, self.max_len)
        self._cache_pre = {i: c for i, c in cache.items() if i < self.first}
        self._cache_post = {i: c for i, c in cache.items() if i >= self.first}
        self.pos = 0
        self._hist = np.zeros((self.batch, 0), np.int64)  # last N-1 compressed ids

    def engram_ids(self, tokens_BxT: np.ndarray) -> dict:
        """Global table rows ``{layer: [B,T,H]}`` of new tokens, continuing the history."""
        if not self.layers:
            return {}
        window = np.concatenate([self._hist, self.compression(tokens_BxT)], axis=1)
        t = tokens_BxT.shape[1]
        ids = self.hasher(window)
        self._hist = window[:, -self.n_hist :] if self.n_hist else window[:, :0]
        return {i: ids[i][:, -t:] + self.offsets[i] for i in self.layers}

    # -- steps -------------------------------------------------------------------------------

    def _forward(self, tokens_dev, tokens_host, sampling=(0.0, 0, None), gids=None):
        """One jitted step over the T tokens of a chunk: -> (logits [B,T,V], next token [B]).
        ``gids``: the chunk's rows if already hashed. ``self.pos`` is a scalar, or ``[B]``
        when every sequence has its own position (``engram_jax.batch_generate``)."""
        b, t = tokens_host.shape
        if b != self.batch:
            raise ValueError(f"batch of {b} sequences, generator built for {self.batch}")
        if np.max(self.pos) + t > self.max_len:
            raise ValueError(f"position {np.max(self.pos) + t} exceeds max_len={self.max_len}")
        pos = jnp.asarray(self.pos, jnp.int32)
        prefetch = getattr(self.rows, "prefetch", None)
        if self.layers and gids is None and (prefetch is not None or not self.overlap):
            gids = self.engram_ids(tokens_host)  # rows known now: a disk store starts reading
            if prefetch is not None:
                prefetch(gids)
        if not self.overlap:
            rows = self.rows(gids) if self.layers else {}
            jax.block_until_ready(rows)
        # 1. dispatch the blocks before the first Engram layer (they need only the tokens) ...
        h, self._cache_pre = self._pre(self._state, tokens_dev, self._cache_pre, pos)
        # 2. ... while the host hashes the new n-grams and fetches their rows
        if self.overlap and self.layers:
            rows = self.rows(self.engram_ids(tokens_host) if gids is None else gids)
        elif self.overlap:
            rows = {}
        temperature, top_k, key = sampling
        key = jax.random.key(0) if key is None else key
        logits, token_B, self._cache_post, _ = self._post(
            self._state,
            h,
            self._cache_post,
            pos,
            rows,
            key,
            jnp.float32(temperature),
            jnp.int32(top_k),
        )
        self.pos += t
        return logits, token_B

    def _chunks(self, tokens_BxT, sampling=(0.0, 0, None)):
        """Feed tokens in power-of-two chunks (at most ``max_chunk``): a handful of compiled
        shapes serves every prompt length, and decode steps reuse the 1-token program."""
        tokens = np.asarray(tokens_BxT, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [B, T] with T >= 1; got {tokens.shape}")
        if np.max(self.pos) + tokens.shape[1] > self.max_len:
            raise ValueError(
                f"position {np.max(self.pos) + tokens.shape[1]} exceeds max_len={self.max_len}"
            )
        # every chunk's rows are known before the first runs: fetch chunk k+1's during chunk k
        gids = self.engram_ids(tokens) if self.layers else None
        prefetch = getattr(self.rows, "prefetch", None) if self.layers else None
        bounds, t0 = [], 0
        while t0 < tokens.shape[1]:
            n = 1 << (min(tokens.shape[1] - t0, self.max_chunk).bit_length() - 1)
            bounds.append((t0, t0 + n))
            t0 += n
        logits = []
        for k, (a, z) in enumerate(bounds):
            chunk, chunk_ids = tokens[:, a:z], None
            if gids is not None:
                chunk_ids = {i: g[:, a:z] for i, g in gids.items()}
                if prefetch is not None and k == 0:
                    prefetch(chunk_ids)
            out, token_B = self._forward(jnp.asarray(chunk), chunk, sampling, chunk_ids)
            if prefetch is not None and k + 1 < len(bounds):
                prefetch({i: g[:, slice(*bounds[k + 1])] for i, g in gids.items()})
            logits.append(out)
        return jnp.concatenate(logits, axis=1), token_B

    def prefill(self, tokens_BxT):
        """Start new sequences: -> float32 logits [B,T,V] of every prompt position."""
        self.reset()
        return self._chunks(tokens_BxT)[0]

    def feed(self, tokens_BxT):
        """Extend the sequences by given tokens: -> logits [B,T,V] of the new positions."""
        return self._chunks(tokens_BxT)[0]

    def generate(
        self,
        prompt_BxP,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        eos_id: int | None = None,
    ) -> GenerateResult:
        """Sample up to ``max_new_tokens`` after the prompt (greedy when ``temperature <= 0``;
        top-k when ``top_k > 0``; ``seed`` fixes the draws). Stops early when every sequence
        has produced ``eos_id`` or the cache is full."""
        self.reset()
        sampling = (float(temperature), int(top_k), jax.random.key(seed))
        prompt = np.asarray(prompt_BxP, np.int32)
        t0 = time.perf_counter()
        _, token_B = self._chunks(prompt, sampling)
        out, done = [], np.zeros(self.batch, bool)
        for step in range(max_new_tokens):
            token_dev = token_B[:, None]
            host = np.asarray(token_dev)  # waits for the previous step
            if step == 0:
                t1, c1 = time.perf_counter(), time.process_time()
            out.append(host)
            if eos_id is not None:
                done |= host[:, 0] == eos_id
            if step == max_new_tokens - 1 or self.pos >= self.max_len or done.all():
                break
            _, token_B = self._forward(token_dev, host, sampling)
        tokens = np.concatenate(out, axis=1) if out else np.zeros((self.batch, 0), np.int32)
        t2, c2 = time.perf_counter(), time.process_time()
        if not out:
            return GenerateResult(tokens, prompt.shape[1], 0, t2 - t0)
        return GenerateResult(tokens, prompt.shape[1], len(out), t1 - t0, t2 - t1, c2 - c1)


# ---------------------------------------------------------------------------------------------
# Trained workdirs


def load_workdir(workdir, step: int | None = None):
    """``(cfg, model, tokenizer, compression)`` of a trained run (latest checkpoint)."""
    from engram_jax.tokenizer import build_compression, load_tokenizer
    from engram_jax.workdir import Workdir

    wd = Workdir(workdir)
    cfg, model = wd.load_model(step)
    sp = load_tokenizer(wd.tokenizer())
    if sp.get_piece_size() != cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {sp.get_piece_size()} pieces, the model {cfg.model.vocab_size}"
        )
    return cfg, model, sp, build_compression(sp, enabled=cfg.engram.compress_tokenizer)


def make_generator(
    model,
    compression: CompressionTable,
    *,
    max_len: int,
    batch: int = 1,
    offload=None,
    release: bool = False,
) -> Generator:
    """A :class:`Generator` with tables resident (``offload=None``) or in host memory
    (``offload``: an ``engram_jax.offload.OffloadConfig``; ``release`` frees the device copy)."""
    rows = None
    if offload is not None and model.engram_layers:
        from engram_jax.offload import HostRows

        rows = HostRows.from_model(model, offload, release=release)
    return Generator(model, compression, max_len=max_len, batch=batch, rows=rows)
