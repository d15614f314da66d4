"""Batched generation: prompts of different lengths decoded together, each as if alone.

Every prompt is prefilled on its own by a batch-1 :class:`~engram_jax.generate.Generator`
(the very programs that decode it alone), then its decode state is copied into row b of a
batch-B Generator: the KV cache (slots ``0 .. L_b-1``), the Engram short-conv history and the
host n-gram history (the last N-1 compressed ids; a prompt shorter than that is left-padded
with the compressed pad id, which is what the hasher reads before a sequence starts, so the
hashes are unchanged). Decoding then runs all rows in one step, each at its own position
``pos_b``: RoPE angle, KV write slot and attention mask (slots ``<= pos_b``) are per row, and
so is the sampling key (``fold_in(key, pos_b)``, as in the solo decode). Slots after ``pos_b``
are hidden, so no row ever sees another's length, and every row keeps its own n-gram history
and conv state (ENGRAM_SPEC sections 2-3, 8).

Greedy output equals decoding each prompt alone, token for token (tests/test_generate.py);
logits agree up to float reassociation of batch-size-dependent matmuls.

Shape legend: B batch (rows), L prompt length.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.generate import DeviceRows, Generator


def _put_row(batch_tree, one_tree, b):
    """Copy the batch-1 decode state ``one_tree`` into row ``b`` of ``batch_tree``."""
    return jax.tree.map(lambda x_B, y_1: x_B.at[b].set(y_1[0]), batch_tree, one_tree)


_put_row_donated = jax.jit(_put_row, donate_argnums=0)


@dataclasses.dataclass
class BatchResult:
    tokens: list[np.ndarray]  # per prompt: generated ids (up to and including eos_id)
    prompt_lens: list[int]
    steps: int  # decode steps run for the whole batch (after the prefill's token)
    prefill_seconds: float = 0.0  # all prompts, until every first token is on the host
    decode_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by live rows during the decode steps


class BatchGenerator:
    """``BatchGenerator(model, compression, batch=B, max_len=S, rows=None)``.

    :meth:`start` prefills up to B prompts (lists of token ids, any lengths >= 1) and returns
    their first sampled tokens; :meth:`step` advances every row by one given token;
    :meth:`generate` samples (greedy when ``temperature <= 0``). ``rows``: a row source shared
    by the prefill and the decode (default: tables resident on the device).
    """

    def __init__(self, model, compression, *, batch: int, max_len: int, rows=None, **kw):
        if rows is None and model.engram_layers:
            rows = DeviceRows(model)
        self.rows = rows
        self.solo = Generator(model, compression, max_len=max_len, batch=1, rows=rows, **kw)
        self.gen = Generator(model, compression, max_len=max_len, batch=batch, rows=rows, **kw)
        self.batch, self.max_len = int(batch), int(max_len)
        self._sampling = (0.0, 0, jax.random.key(0))

    def _check(self, prompts, max_new_tokens: int) -> list[np.ndarray]:
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        if not 1 <= len(prompts) <= self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        need = max(len(p) for p in prompts) + max_new_tokens - 1
        if need > self.max_len:
            raise ValueError(
                f"a prompt of {need - max_new_tokens + 1} tokens + "
                f"{max_new_tokens} new ones needs max_len >= {need}"
            )
        return prompts

    def start(self, prompts, *, temperature=0.0, top_k=0, seed=0, max_new_tokens=1):
        """Prefill each prompt alone and gather the decode states: -> first tokens [B]
        (device; rows past ``len(prompts)`` are idle and decode token 0 from position 0)."""
        prompts = self._check(prompts, max_new_tokens)
        gen, solo = self.gen, self.solo
        self._sampling = (float(temperature), int(top_k), jax.random.key(seed))
        gen.reset()
        hist = np.zeros((self.batch, gen.n_hist), np.int64)
        if gen.layers:
            hist[:] = gen.hasher.pad_id  # rows before a sequence start read the pad id
        pos, first = np.zeros(self.batch, np.int64), [jnp.zeros((1,), jnp.int32)] * self.batch
        for b, prompt in enumerate(prompts):
            solo.reset()
            _, first[b] = solo._chunks(prompt[None], self._sampling)
            gen._cache_pre, gen._cache_post = _put_row_donated(
                (gen._cache_pre, gen._cache_post),
                (solo._cache_pre, solo._cache_post),
                jnp.int32(b),
            )
            if gen.n_hist and solo._hist.shape[1]:
                hist[b, -solo._hist.shape[1] :] = solo._hist[0]
            pos[b] = len(prompt)
        gen.pos, gen._hist = pos, hist
        self.prompt_lens = [len(p) for p in prompts]
        return jnp.concatenate(first)

    def step(self, token_dev_B, token_host_B):
        """Feed one token per row (device and host copies): -> next tokens [B] (device)."""
        token_host = np.asarray(token_host_B, np.int32).reshape(self.batch, 1)
        _, token_B = self.gen._forward(
            jnp.reshape(token_dev_B, (self.batch, 1)), token_host, self._sampling
        )
        return token_B

    def generate(
        self, prompts, max_new_tokens: int, *, temperature=0.0, top_k=0, seed=0, eos_id=None
    ) -> BatchResult:
        """Up to ``max_new_tokens`` per prompt; a row stops at ``eos_id`` (kept)."""
        t0 = time.perf_counter()
        token_B = self.start(
            prompts, temperature=temperature, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens
        )
        n = len(self.prompt_lens)
        out, done, produced = [], np.zeros(self.batch, bool), 0
        done[n:] = True
        for step in range(max_new_tokens):
            host = np.asarray(token_B)  # waits for the previous step
            if step == 0:
                t1, c1 = time.perf_counter(), time.process_time()
            else:
                produced += int((~done).sum())
            out.append(np.where(done, -1, host))
            if eos_id is not None:
                done |= host == eos_id
            if step == max_new_tokens - 1 or done.all():
                break
            token_B = self.step(token_B, host)
        t2, c2 = time.perf_counter(), time.process_time()
        grid = np.stack(out, axis=1)  # [B, steps]; -1 after a row stopped
        tokens = [grid[b][grid[b] >= 0] for b in range(n)]
        return BatchResult(
            tokens, self.prompt_lens, len(out) - 1, t1 - t0, t2 - t1, c2 - c1, produced
        )
