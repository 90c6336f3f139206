"""A decoder-only transformer (Llama / Qwen2 / Qwen3) in flax.nnx with layers stacked for scan.

Layer weights carry a leading ``layers`` axis and are applied with ``jax.lax.scan`` (fast compiles
for deep models, optional remat per layer). Every parameter carries ``logical_axes`` metadata
(see ``fst_jax.sharding``) so it can be sharded over a mesh.

Entry points:
- ``__call__(tokens, positions, mask, adapters=None)``: full causal forward, logits ``[B, T, V]``
  float32, optionally with LoRA adapters applied on the activations (for training); ``hidden``
  returns the last hidden states and keys/values instead.
- ``extend(tokens, positions, mask, shared)``: prefill for sampling, attending to *shared prefix
  levels* (``SharedKV``): e.g. the keys/values of a few contexts, each read by all the
  (context, task) prompts that use it.
- ``decode(...)``: one new token per row against shared prefix levels (contexts, then prompts)
  and a per-row suffix cache; each prefix's keys/values are stored and read once for all the
  rows that share it (``shared_attention``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fst_jax.models.configs import ModelConfig
from fst_jax.sharding import shard_rows

_NEG = -1e30


class KV(NamedTuple):
    """Stacked keys and values, ``[layers, batch, kv_heads, length, head_dim]`` (the layout the
    decode attention's batched matmuls read without transposes)."""

    k: jax.Array
    v: jax.Array


class SharedKV(NamedTuple):
    """One shared prefix level: ``k``/``v`` ``[L, P, K, S, hd]`` (or per-layer lists of
    ``[P, K, S, hd]``) and ``mask`` bool ``[P, S]``; the rows of a batch of ``B`` read prefix
    ``row // (B // P)``."""

    k: jax.Array | list
    v: jax.Array | list
    mask: jax.Array


def shared_attention(q, shared, own, scale: float, query_chunk: int | None = None) -> jax.Array:
    """Softmax attention of ``q [B, T, K, G, hd]`` over the concatenation of
    ``shared`` parts ``(k, v [P, K, S, hd], mask [P, S])``, each key read once for its ``B // P``
    consecutive rows (one batched matmul per prefix), and ``own`` per-row parts
    ``(k, v [B, K, S, hd], ok)`` with ``ok`` broadcastable to ``[B, K, G, T, S]`` (or True).
    Scores and the softmax are float32. Returns ``[B, T, K, G, hd]`` float32.

    ``query_chunk``: when ``T`` is longer, the queries are taken ``query_chunk`` at a time in
    sequence (the same result: each query's softmax is its own), so the float32 scores held at
    once are ``[B, K, G, query_chunk, S]`` instead of ``[B, K, G, T, S]``: a long prompt's
    prefill no longer needs memory quadratic in its length."""
    B, T, K, G, hd = q.shape
    if query_chunk is not None and T > query_chunk:
        C = query_chunk
        n = -(-T // C)
        pad = n * C - T  # padded query rows see no key and are dropped

        def chunks(x, axis):  # split ``axis`` (length T) into [n, C] and move n to the front
            axis %= x.ndim
            x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
            return jnp.moveaxis(x.reshape(*x.shape[:axis], n, C, *x.shape[axis + 1:]), axis, 0)

        oks = [None if ok is True or ok.shape[-2] == 1 else chunks(ok, -2) for _, _, ok in own]

        def one(xs):  # lax.map: the chunks run one after another, their scores never live together
            qc, okc = xs
            return shared_attention(qc, shared, [(k, v, ok if c is None else c) for (k, v, ok), c
                                                 in zip(own, okc)], scale)

        out = jax.lax.map(one, (chunks(q, 1), oks))  # [n, B, C, K, G, hd]
        return jnp.moveaxis(out, 0, 1).reshape(B, n * C, K, G, hd)[:, :T]
    f32 = jnp.float32
    scores, values = [], []
    for k, v, mask in shared:
        P = k.shape[0]
        qs = q.reshape(P, B // P, T, K, G, hd)
        s = jnp.einsum("pjtkgd,pksd->pjkgts", qs, k, preferred_element_type=f32)
        s = jnp.where(mask[:, None, None, None, None, :], s, _NEG)
        scores.append(s.reshape(B, K, G, T, -1))
        values.append((v, True))
    for k, v, ok in own:
        s = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=f32)
        scores.append(jnp.where(ok, s, _NEG))
        values.append((v, False))
    probs = jax.nn.softmax(jnp.concatenate(scores, -1) * scale, axis=-1)
    out, start = 0.0, 0
    for (v, is_shared), s in zip(values, scores):
        p = probs[..., start:start + s.shape[-1]].astype(v.dtype)
        start += s.shape[-1]
        if is_shared:
            P = v.shape[0]
            p = p.reshape(P, B // P, K, G, T, -1)
            o = jnp.einsum("pjkgts,pksd->pjtkgd", p, v, preferred_element_type=f32)
            out = out + o.reshape(B, T, K, G, hd)
        else:
            out = out + jnp.einsum("bkgts,bksd->btkgd", p, v, preferred_element_type=f32)
    return out


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = None, value: float | None = None):
    if value is not None:
        arr = jnp.full(shape, value, dtype)
    else:
        arr = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(arr, logical_axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as transformers does), returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]`` float32, with Llama 3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = cfg.rope_scaling
    if rs.rope_type == "llama3":
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, hd]`` by ``positions [B, T]`` (rotate-half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading ``layers`` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K, hd, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, cfg.intermediate_size)
        dt = jnp.dtype(cfg.param_dtype)
        std = 0.02
        self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), dt, value=1.0)
        self.wq = _param(rngs, (L, D, H, hd), ("layers", "embed", "heads", "head_dim"), dt, std)
        self.wk = _param(rngs, (L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim"), dt, std)
        self.wv = _param(rngs, (L, D, K, hd), ("layers", "embed", "kv_heads", "head_dim"), dt, std)
        self.wo = _param(rngs, (L, H, hd, D), ("layers", "heads", "head_dim", "embed"), dt, std)
        if cfg.attention_bias:
            self.bq = _param(rngs, (L, H, hd), ("layers", "heads", "head_dim"), dt, std)
            self.bk = _param(rngs, (L, K, hd), ("layers", "kv_heads", "head_dim"), dt, std)
            self.bv = _param(rngs, (L, K, hd), ("layers", "kv_heads", "head_dim"), dt, std)
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, hd), ("layers", "norm"), dt, value=1.0)
            self.k_norm = _param(rngs, (L, hd), ("layers", "norm"), dt, value=1.0)
        self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), dt, value=1.0)
        self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), dt, std)
        self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), dt, std)
        self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), dt, std)

    def weights(self) -> dict[str, jax.Array]:
        """The stacked weight arrays by name (the pytree scanned over)."""
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def _dense(spec: str, x: jax.Array, w: dict, name: str, ad: dict) -> jax.Array:
    """``einsum(spec, x, w[name])`` in ``x.dtype``, plus the LoRA path ``(x a) b`` when ``ad``
    holds ``name``'s adapters ``(a [*in, r], b [r, *out])`` (scale folded into ``b``)."""
    dt = x.dtype
    y = jnp.einsum(spec, x, w[name].astype(dt))
    if name not in ad:
        return y
    a, b = ad[name]
    x_ax, rest = spec.split(",")
    w_ax, out_ax = rest.split("->")
    contracted = "".join(c for c in w_ax if c in x_ax)
    kept = "".join(c for c in x_ax if c not in w_ax)
    w_out = "".join(c for c in w_ax if c not in x_ax)
    low = jnp.einsum(f"{x_ax},{contracted}r->{kept}r", x, a.astype(dt))
    return y + jnp.einsum(f"{kept}r,r{w_out}->{out_ax}", low, b.astype(dt))


def _qkv(cfg: ModelConfig, w: dict, ad: dict, h: jax.Array, positions: jax.Array,
         inv_freq: jax.Array):
    dt = h.dtype
    q = _dense("btd,dhk->bthk", h, w, "wq", ad)
    k = _dense("btd,dhk->bthk", h, w, "wk", ad)
    v = _dense("btd,dhk->bthk", h, w, "wv", ad)
    if cfg.attention_bias:
        q, k, v = q + w["bq"].astype(dt), k + w["bk"].astype(dt), v + w["bv"].astype(dt)
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _mlp_block(cfg: ModelConfig, w: dict, ad: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection, residual, SwiGLU MLP, residual."""
    x = x + _dense("bthk,hkd->btd", attn.astype(x.dtype), w, "wo", ad)
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate = _dense("btd,df->btf", h, w, "w_gate", ad)
    up = _dense("btd,df->btf", h, w, "w_up", ad)
    return x + _dense("btf,fd->btd", jax.nn.silu(gate) * up, w, "w_down", ad)


class Transformer(nnx.Module):
    """Decoder-only LM. Inputs: ``tokens``/``positions`` int32 ``[B, T]``, ``mask`` bool ``[B, T]``
    (True for real tokens; padding may be on either side)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, 0.02)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), dt, value=1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt,
                                  0.02)

    # -- pieces ---------------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return shard_rows(jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: ``[..., D]`` -> float32 ``[..., V]``."""
        h = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed[...].astype(h.dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def _scan(self, body, x, xs):
        if self.cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, x, xs)

    # -- full forward / prefill -----------------------------------------------------------
    def hidden(self, tokens, positions, mask, adapters: dict | None = None) -> tuple[jax.Array, KV]:
        """Causal forward to the last hidden state ``[B, T, D]`` and per-layer keys/values.

        ``adapters``: optional LoRA ``{target: (a [L, *in, r], b [L, r, *out])}`` (scale folded
        into ``b``) applied on the activations, ``y = x W + (x a) b``; ``W`` is used as is."""
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg)
        T = tokens.shape[1]
        allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]  # [B, Tq, Tk]
        G = cfg.num_heads // cfg.num_kv_heads
        scale = cfg.head_dim ** -0.5

        def body(x, layer):
            w, ad = layer
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            q, k, v = _qkv(cfg, w, ad, h, positions, inv_freq)
            B, _, H, hd = q.shape
            qg = q.reshape(B, T, cfg.num_kv_heads, G, hd)
            s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where(allowed[:, None, None], s, _NEG)
            probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
            attn = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
            attn = attn.reshape(B, T, H, hd)
            return shard_rows(_mlp_block(cfg, w, ad, x, attn)), (k.swapaxes(1, 2), v.swapaxes(1, 2))

        xs = (self.layers.weights(), adapters or {})
        x, (ks, vs) = self._scan(body, self.embed_tokens(tokens), xs)
        return x, KV(ks, vs)

    def __call__(self, tokens, positions, mask, adapters: dict | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` float32 for next-token prediction at every position (``adapters``
        as in ``hidden``)."""
        x, _ = self.hidden(tokens, positions, mask, adapters)
        return self.logits(x)

    # -- sampling: prefill against shared prefixes, decode ----------------------------------
    def extend(self, tokens, positions, mask, shared: Sequence[SharedKV] = (),
               layer_weights: list[dict] | None = None, query_chunk: int | None = None
               ) -> tuple[jax.Array, KV]:
        """Causal forward of ``tokens [B, T]`` (``positions``, ``mask`` as in ``hidden``) that also
        attends to ``shared`` prefix levels; returns the hidden states ``[B, T, D]`` and this
        pass's keys/values ``[L, B, K, T, hd]`` (lists per layer with ``layer_weights``).

        A level ``SharedKV(k, v, mask)`` holds ``P`` prefixes (``k``/``v`` ``[L, P, K, S, hd]``,
        ``mask [P, S]``) shared by consecutive rows: row ``b`` reads prefix ``b // (B // P)``.
        With no levels this is the plain prompt prefill. ``query_chunk`` bounds the attention
        scores held at once (``shared_attention``)."""
        T = tokens.shape[1]
        own_ok = (jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :])[:, None, None]
        x = self.embed_tokens(tokens)
        return self._run_layers(x, positions, shared, [own_ok], [], layer_weights, query_chunk)

    def decode(self, token, position, shared: Sequence[SharedKV], suffix: KV, step,
               layer_weights: list[dict] | None = None) -> tuple[jax.Array, KV]:
        """One decode step for ``B`` rows.

        token, position: int32 ``[B]``; ``shared``: prefix levels as in ``extend`` (e.g. the
        contexts, then the (context, task) prompts); suffix: ``[L, B, K, S, hd]`` per-row cache of
        which slots ``< step`` are valid. Returns logits ``[B, V]`` float32 and this step's
        keys/values ``[L, B, K, 1, hd]`` (the caller writes slot ``step``).

        With ``layer_weights`` (from ``unstack_layers``) the caches are per-layer lists instead of
        stacked arrays, the new keys/values come back as lists too, and the layers run as an
        unrolled loop: XLA's CPU backend copies every per-step dynamic slice of a scanned
        operand, which makes the scanned decode about 1.5x slower there.
        """
        S = suffix.k[0].shape[-2]
        suffix_ok = (jnp.arange(S) < step)[None, None, None, None, :]
        x = self.embed_tokens(token[:, None])
        x, kv = self._run_layers(x, position[:, None], shared, [suffix_ok, True], [suffix],
                                 layer_weights)
        return self.logits(x[:, 0]), kv

    def _run_layers(self, x, positions, shared, own_ok, caches, layer_weights, query_chunk=None):
        """Layers over ``x [B, T, D]``: attention to the ``shared`` levels, to per-row ``caches``
        (KV ``[L, B, K, S, hd]``) and to this pass's own keys; ``own_ok`` holds one mask per
        per-row part (caches, then own), broadcastable to ``[B, K, G, T, S]``."""
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg)
        K, G, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        B, T = x.shape[:2]

        def body(x, layer):
            w, levels, rows = layer
            h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
            q, k, v = _qkv(cfg, w, {}, h, positions, inv_freq)
            q = q.reshape(B, T, K, G, hd)
            parts = [(pk, pv, lvl.mask) for (pk, pv), lvl in zip(levels, shared)]
            own = [(ck, cv, ok) for (ck, cv), ok in zip(rows, own_ok)]
            own.append((k.swapaxes(1, 2), v.swapaxes(1, 2), own_ok[-1]))
            attn = shared_attention(q, parts, own, hd ** -0.5, query_chunk)
            return _mlp_block(cfg, w, {}, x, attn.reshape(B, T, -1, hd)), (k.swapaxes(1, 2),
                                                                            v.swapaxes(1, 2))

        if layer_weights is None:
            xs = (self.layers.weights(), [(lvl.k, lvl.v) for lvl in shared],
                  [(c.k, c.v) for c in caches])
            x, (ks, vs) = self._scan(body, x, xs)
            return x, KV(ks, vs)
        ks, vs = [], []
        for i, w in enumerate(layer_weights):
            layer = (w, [(lvl.k[i], lvl.v[i]) for lvl in shared], [(c.k[i], c.v[i]) for c in caches])
            x, (k, v) = body(x, layer)
            ks.append(k)
            vs.append(v)
        return x, KV(ks, vs)

    def unstack_layers(self) -> list[dict[str, jax.Array]]:
        """Per-layer weight dicts (copies of the stacked weights' slices) for unrolled decoding."""
        stacked = self.layers.weights()
        return [{k: w[i] for k, w in stacked.items()} for i in range(self.cfg.num_layers)]


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (normal(0.02) weights, unit norms)."""
    return Transformer(cfg, nnx.Rngs(params=seed))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions ``[B, T]`` int32 counting real tokens only (0 at each row's first real token)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
