"""The language model: embedding -> M mHC branches -> blocks -> branch mean, norm -> LM head.

Block ``l`` (ENGRAM_SPEC section 1):

    H <- H + Engram_l(H, ids_l)                  only for l in cfg.engram.layer_ids
    H <- mHC_attn(H, Attention(RMSNorm(.)))      hyper.py: H_res H + H_post^T F(H_pre H)
    H <- mHC_ffn(H, FFN(RMSNorm(.)))             dense SwiGLU for l < n_dense_layers, else MoE

The residual stream H is float32 [B, T, M, D] (M = hc_mult; M = 1 is a plain residual
stream); sublayers compute in ``ModelConfig.dtype``; parameters and logits are float32. The
readout takes the mean over branches, then RMSNorm and the LM head
(untied unless ``tie_embeddings``; tied logits are ``h E^T / sqrt(D)``). Embedding init is
N(0, 1). With ``cfg.engram.layer_ids == ()`` there are no Engram modules at all.

Engram hash ids come from the input pipeline (``engram_jax.hashing``), never from the model.

``ModelConfig.scan_layers``: each run of consecutive blocks of one structure without Engram
(:func:`engram_jax.layer_stack.block_runs`) is applied by one ``lax.scan`` (MaxText's
scan_layers), so a deep model compiles the block once; ``ModelConfig.remat`` recomputes each
block in the backward pass either way. The values are those of the unrolled model
(tests/test_scan_layers.py).

Shape legend: B batch, T sequence, M mHC branches, D d_model, V vocabulary, E experts,
H hash heads per Engram layer, d Engram row width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax import sharding as shd
from engram_jax.attention import make_attention
from engram_jax.config import Config
from engram_jax.engram import Engram
from engram_jax.hashing import table_sizes
from engram_jax.hyper import HyperConnection
from engram_jax.layer_stack import block_runs
from engram_jax.layers import Linear, RMSNorm, param
from engram_jax.moe import MoE, SwiGLU


class Block(nnx.Module):
    def __init__(
        self, cfg: Config, layer: int, *, engram_sizes, rngs: nnx.Rngs, row_multiple: int = 1
    ):
        m = cfg.model
        d, dt = m.d_model, jnp.dtype(m.dtype)
        self.dtype = dt
        self.engram = (
            None
            if engram_sizes is None
            else Engram(
                cfg.engram,
                layer,
                d,
                m.hc_mult,
                table_sizes=engram_sizes,
                rngs=rngs,
                row_multiple=row_multiple,
                dtype=dt,
            )
        )

        def hc():
            return HyperConnection(
                d,
                m.hc_mult,
                layer_index=layer,
                sinkhorn_iters=m.sinkhorn_iters,
                dynamic=m.hc_dynamic,
                eps=m.norm_eps,
                rngs=rngs,
            )

        self.attn_hc, self.attn_norm = hc(), RMSNorm(d, m.norm_eps)
        self.attn = make_attention(m, rngs=rngs)
        self.ffn_hc, self.ffn_norm = hc(), RMSNorm(d, m.norm_eps)
        self.is_moe = layer >= m.n_dense_layers
        self.ffn = (
            MoE(cfg.moe, d, dtype=dt, rngs=rngs)
            if self.is_moe
            else SwiGLU(d, m.dense_hidden, dtype=dt, rngs=rngs)
        )

    def __call__(self, h_BxTxMxD, ids=None, rows=None):
        """-> (h, expert load [E] or None, Engram gates [B,T,M] or None)."""
        gates_BxTxM = None
        if self.engram is not None:
            y_BxTxMxD, gates_BxTxM = self.engram(
                h_BxTxMxD, ids=ids, rows=rows, return_gates=True, h_pre_BxTxD=self._h_pre(h_BxTxMxD)
            )
            h_BxTxMxD = h_BxTxMxD + y_BxTxMxD.astype(h_BxTxMxD.dtype)
        h_BxTxMxD, load_E, _ = self._attn_ffn(h_BxTxMxD, lambda x: (self.attn(x), None))
        return h_BxTxMxD, load_E, gates_BxTxM

    def step(self, h_BxTxMxD, cache: dict, pos, rows=None):
        """``__call__`` for T new positions starting at ``pos``, against the decode state
        ``cache = {"kv": {"k", "v"}, "conv": ...}`` (:meth:`init_cache`); ``rows`` are the
        gathered Engram rows of these positions. -> (h, new cache, Engram gates or None)."""
        cache = dict(cache)
        gates_BxTxM = None
        if self.engram is not None:
            y_BxTxMxD, gates_BxTxM, cache["conv"] = self.engram.step(
                h_BxTxMxD, cache["conv"], rows=rows, h_pre_BxTxD=self._h_pre(h_BxTxMxD)
            )
            h_BxTxMxD = h_BxTxMxD + y_BxTxMxD.astype(h_BxTxMxD.dtype)
        h_BxTxMxD, _, cache["kv"] = self._attn_ffn(
            h_BxTxMxD, lambda x: self.attn.step(x, cache["kv"], pos)
        )
        return h_BxTxMxD, cache, gates_BxTxM

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Zero decode state of this block: the KV cache and, with Engram, its conv history."""
        k_shape, v_shape = self.attn.cache_shapes(batch, max_len)
        cache = {"kv": {"k": jnp.zeros(k_shape, self.dtype), "v": jnp.zeros(v_shape, self.dtype)}}
        if self.engram is not None:
            cache["conv"] = self.engram.init_cache(batch)
        return cache

    def _h_pre(self, h_BxTxMxD):
        """Engram without multi-branch fusion gates on the pre-mapped state H_pre x (spec
        section 4): the attention sublayer's mHC pre-mapping of the branches."""
        if self.engram.n_groups == self.engram.hc_mult:
            return None
        return self.attn_hc.read(h_BxTxMxD)[0]

    def _attn_ffn(self, h_BxTxMxD, attention):
        """The attention and FFN sublayers, each read from and written back to the branches.
        ``attention(x) -> (y, extra)``. -> (h, expert load or None, extra)."""
        u_BxTxD, maps = self.attn_hc.read(h_BxTxMxD)
        y_BxTxD, extra = attention(self.attn_norm(u_BxTxD).astype(self.dtype))
        h_BxTxMxD = self.attn_hc.write(h_BxTxMxD, y_BxTxD, maps)
        u_BxTxD, maps = self.ffn_hc.read(h_BxTxMxD)
        x_BxTxD = self.ffn_norm(u_BxTxD).astype(self.dtype)
        y_BxTxD, load_E = self.ffn(x_BxTxD) if self.is_moe else (self.ffn(x_BxTxD), None)
        return self.ffn_hc.write(h_BxTxMxD, y_BxTxD, maps), load_E, extra


def _run_block(block: Block, h, ids, rows):
    return block(h, ids, rows)


def _run_block_remat(block: Block, h, ids, rows):
    """``_run_block`` recomputed in the backward pass: only the block's inputs are saved.
    A pure ``jax.checkpoint`` over the split block (a block's call mutates no state):
    ``nnx.remat`` refuses Variables merged at another trace level, as in the train step."""
    graphdef, state = nnx.split(block)
    pure = lambda state, h, ids, rows: nnx.merge(graphdef, state)(h, ids, rows)
    return jax.checkpoint(pure)(state, h, ids, rows)


def _scan_blocks(blocks: list[Block], h_BxTxMxD, *, remat: bool, collect: bool):
    """Blocks of one structure (no Engram) applied by one ``lax.scan`` over their states
    stacked on a leading layer axis: the compiled program holds the block once instead of
    ``len(blocks)`` copies. The stack is built here, in the step, from the per-block states
    (a copy of these blocks' parameters; their gradients come back through the stack's
    transpose), so parameters, optimizer groups, checkpoints and per-layer initialization
    are those of the unrolled model. -> (h, expert loads [L,E] or None, hidden [L,...] or None).
    """
    graphdef = nnx.graphdef(blocks[0])
    if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
        raise ValueError("scan_layers: a run of blocks differs in structure (see block_runs)")
    states = [nnx.state(b) for b in blocks]
    stacked = shd.constrain_stacked(jax.tree.map(lambda *xs: jnp.stack(xs), *states))

    def body(h_BxTxMxD, state):
        h_BxTxMxD, load_E, _ = nnx.merge(graphdef, state)(h_BxTxMxD)
        h_BxTxMxD = shd.constrain_batch(h_BxTxMxD)
        return h_BxTxMxD, (load_E, h_BxTxMxD if collect else None)

    # as _run_block_remat: only each block's input (the scan carry) is saved for the backward
    body = jax.checkpoint(body) if remat else body
    h_BxTxMxD, (loads_LxE, hidden) = jax.lax.scan(body, h_BxTxMxD, stacked)
    return h_BxTxMxD, loads_LxE, hidden


class EngramLM(nnx.Module):
    """``EngramLM(cfg, rngs=nnx.Rngs(0))(tokens_BxT, engram_ids) -> (logits_BxTxV, aux)``.

    ``engram_ids``: ``{layer: ids [B,T,H]}`` from :class:`engram_jax.hashing.NgramHasher`;
    or ``engram_rows``: ``{layer: rows [B,T,H,d]}`` from :meth:`gather_engram_rows` (to take
    gradients w.r.t. the gathered rows instead of the tables). ``row_multiple`` pads every
    table's rows to a multiple (for sharding).

    ``aux``: ``moe_loads {layer: int32 [E]}`` (tokens that selected each expert; feed to
    :func:`engram_jax.moe.update_router_bias`), ``engram_gates {layer: float32 [B,T,M]}``,
    and with ``collect=True`` ``hidden {layer: float32 [B,T,M,D]}`` (the stream after each
    block; :meth:`readout` turns one into logits, e.g. for LogitLens).
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, row_multiple: int = 1):
        m = cfg.model
        self.cfg = cfg
        sizes = table_sizes(cfg.engram) if cfg.engram.enabled else {}
        self.embed = param(
            jax.random.normal(rngs.params(), (m.vocab_size, m.d_model)), ("vocab", "embed")
        )
        self.blocks = nnx.List(
            [
                Block(cfg, i, engram_sizes=sizes.get(i), rngs=rngs, row_multiple=row_multiple)
                for i in range(m.n_layers)
            ]
        )
        self.final_norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = (
            None
            if m.tie_embeddings
            else Linear(
                m.d_model,
                m.vocab_size,
                use_bias=False,
                axes=("embed", "vocab"),
                dtype=m.dtype,
                rngs=rngs,
            )
        )

    @property
    def engram_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.engram is not None)

    def gather_engram_rows(self, engram_ids: dict) -> dict:
        """``{layer: ids [B,T,H]} -> {layer: rows [B,T,H,d]}`` (float32) for every Engram layer."""
        return {i: self.blocks[i].engram.table.rows(engram_ids[i]) for i in self.engram_layers}

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        """Token embeddings copied into the M residual branches: [B,T,M,D]."""
        m = self.cfg.model
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0)
        return jnp.broadcast_to(x_BxTxD[:, :, None, :], x_BxTxD.shape[:2] + (m.hc_mult, m.d_model))

    def readout(self, h_BxTxMxD: jax.Array) -> jax.Array:
        """Final norm of the branch mean, then the LM head: float32 logits [B,T,V]."""
        dt = jnp.dtype(self.cfg.model.dtype)
        x_BxTxD = self.final_norm(jnp.mean(h_BxTxMxD.astype(jnp.float32), axis=2)).astype(dt)
        if self.head is not None:
            return self.head(x_BxTxD).astype(jnp.float32)
        w_VxD = self.embed[...].astype(dt)
        logits = jnp.einsum("btd,vd->btv", x_BxTxD, w_VxD, preferred_element_type=jnp.float32)
        return logits * self.cfg.model.d_model**-0.5

    def __call__(
        self,
        tokens_BxT: jax.Array,
        engram_ids: dict | None = None,
        engram_rows: dict | None = None,
        *,
        collect: bool = False,
    ):
        m = self.cfg.model
        ids, rows = engram_ids or {}, engram_rows or {}
        missing = [i for i in self.engram_layers if i not in ids and i not in rows]
        if missing:
            raise ValueError(
                f"Engram layers {missing} need engram_ids or engram_rows "
                "(hash ids come from engram_jax.hashing in the input pipeline)"
            )
        h_BxTxMxD = shd.constrain_batch(self.embed_tokens(tokens_BxT))
        run = _run_block_remat if m.remat else _run_block
        aux = {"moe_loads": {}, "engram_gates": {}}
        if collect:
            aux["hidden"] = {}
        for start, stop in block_runs(self.cfg):
            if stop - start > 1:
                blocks = [self.blocks[i] for i in range(start, stop)]
                h_BxTxMxD, loads_LxE, hidden = _scan_blocks(
                    blocks, h_BxTxMxD, remat=m.remat, collect=collect
                )
                for k, i in enumerate(range(start, stop)):
                    if loads_LxE is not None:
                        aux["moe_loads"][i] = loads_LxE[k]
                    if collect:
                        aux["hidden"][i] = hidden[k]
                continue
            # pre-gathered rows win: the caller differentiates w.r.t. them
            layer_rows = rows.get(start)
            layer_ids = None if layer_rows is not None else ids.get(start)
            h_BxTxMxD, load_E, gates_BxTxM = run(
                self.blocks[start], h_BxTxMxD, layer_ids, layer_rows
            )
            h_BxTxMxD = shd.constrain_batch(h_BxTxMxD)
            if load_E is not None:
                aux["moe_loads"][start] = load_E
            if gates_BxTxM is not None:
                aux["engram_gates"][start] = gates_BxTxM
            if collect:
                aux["hidden"][start] = h_BxTxMxD
        return self.readout(h_BxTxMxD), aux
