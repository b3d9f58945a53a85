"""Independent forwards of the five founding systems (PRs #490, #1148, #1406, #1499, #1550), written from their
scripts, for the preset and converter tests.

Nothing here imports pgolf. Each forward reads a record-format state dict (the scripts' own key names: per-layer
``CastedLinear`` weights or the four banks, ``smear.gate``, ``bigram.*``, ``ve_shared.*``, ``ve_layer_scales.{i}``,
``attn_gate``, ``vr_lambda`` / ``v_lambda``, ``hidden_gain``, ``lane_merge``), computes in float64 with an explicit
softmax attention matrix, and returns softcapped logits. RoPE comes from ``record_reference.record_rope``: the
2026-03 scripts rescale above their hard-coded 1024 (fp32 tables) and use their bf16 ``inv_freq`` buffer below;
#1499 never rescales.

Small widths as in ``record_reference`` (d=64, 2 query heads of 32 dims, 1 KV head); the layer structure is each
record's own (11 layers, its skips, recurrence and parallel layouts).
"""

from __future__ import annotations

import math

import torch

from tests.model.record_reference import F64, HD, HKV, H, L, D, V, record_rope, rms, rope, softcap

HID = 128
BIGRAM, BDIM = 61, 16


def _params(raw_sd):
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v.to(F64) for k, v in raw_sd.items()}


# ---- pieces every script shares ---------------------------------------------------------------------------------

def bigram(P, ids):
    """BigramHashEmbedding: bucket (36313·t xor 27191·t_prev) mod (n−1), position 0 → n−1; proj; × scale."""
    n = P["bigram.embed.weight"].shape[0]
    h = torch.empty_like(ids)
    h[:, 0] = n - 1
    h[:, 1:] = torch.bitwise_xor(36313 * ids[:, 1:], 27191 * ids[:, :-1]) % (n - 1)
    return (P["bigram.embed.weight"][h] @ P["bigram.proj.weight"].T) * P["bigram.scale"]


def embed(P, ids):
    """tok_emb (+ bigram) → RMSNorm → SmearGate: (1 − g)·x + g·x_prev with zeros before position 0."""
    x = P["tok_emb.weight"][ids]
    if "bigram.embed.weight" in P:
        x = x + bigram(P, ids)
    x = rms(x)
    g = torch.sigmoid(P["smear.gate"])
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return (1 - g) * x + g * prev


def attention(u, W, cos, sin, *, v0=None, vr=None, lam=None, ve=None, xsa=None, gate=None):
    """One attention of the 2026-03 scripts. W: (Wq, Wk, Wv, Wo, q_gain). Returns (out, raw v).

    vr: 'linear' v = λ0·v0 + λ1·v (#490); 'softmax' v = s0·v + s1·v0, s = softmax(λ) (#1499). xsa: 'projection'
    y − (y·v̂)v̂ (#1148 lineage) or 'diagonal' y − a_ii·v_i (#1499). gate: (W, b) of #490's σ(u Wᵀ + b) per head.
    """
    Wq, Wk, Wv, Wo, gain = W
    B, T, _ = u.shape
    q = rms((u @ Wq.T).view(B, T, H, HD))
    k = rms((u @ Wk.T).view(B, T, HKV, HD))
    v = u @ Wv.T
    if ve is not None:
        v = v + ve
    v = v.view(B, T, HKV, HD)
    raw_v = v
    if vr == "linear" and v0 is not None:
        v = lam[0] * v0 + lam[1] * v
    elif vr == "softmax" and v0 is not None:
        s = torch.softmax(lam, dim=0)
        v = s[0] * v + s[1] * v0
    q, k = rope(q, cos, sin) * gain[:, None], rope(k, cos, sin)
    group = torch.arange(H) // (H // HKV)
    kh, vh = k[:, :, group], v[:, :, group]  # (B, T, H, HD)
    scores = torch.einsum("bthd,bshd->bhts", q, kh) / math.sqrt(HD)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, T, T)
    y = torch.einsum("bhts,bshd->bthd", a, vh)
    if xsa == "projection":
        vhat = vh / vh.norm(dim=-1, keepdim=True)
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    elif xsa == "diagonal":
        y = y - torch.diagonal(a, dim1=-2, dim2=-1).transpose(1, 2)[..., None] * vh
    if gate is not None:
        y = y * torch.sigmoid(u @ gate[0].T + gate[1])[..., None]
    return y.reshape(B, T, D) @ Wo.T, raw_v


def mlp(u, up, down, gain=None):
    h = torch.where(u @ up.T > 0, u @ up.T, 0.5 * (u @ up.T)) ** 2
    return (h * gain if gain is not None else h) @ down.T


def unet(x, blocks_enc, blocks_dec, skip_weights):
    """Encoder then decoder with additive skips x += w_j·skips.pop() while skips and weights last."""
    skips = []
    for f in blocks_enc:
        x = f(x)
        skips.append(x)
    for j, f in enumerate(blocks_dec):
        if skips and j < skip_weights.shape[0]:
            x = x + skip_weights[j] * skips.pop()
        x = f(x)
    return x


# ---- PR #490 ------------------------------------------------------------------------------------------------------

def pr490_logits(raw_sd, ids):
    """#490: 11 sequential blocks, value residual λ pair on block 0's raw V, gated attention with bias, full RoPE
    (NTK above 1024), no LN scale, additive skips. It has no recurrence."""
    P = _params(raw_sd)
    T = ids.shape[1]
    cos, sin = record_rope(T, "r3_compiled", train_seq_len=1024, rd=HD)
    x = x0 = embed(P, ids)
    state = {"v0": None}

    def block(i):
        p = f"blocks.{i}."

        def f(x):
            mix = P[p + "resid_mix"]
            x = mix[0] * x + mix[1] * x0
            W = tuple(P[p + n] for n in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                                         "attn.q_gain"))
            a, raw_v = attention(rms(x), W, cos, sin, v0=state["v0"], vr="linear", lam=P.get(p + "attn.vr_lambda"),
                                 gate=(P[p + "attn.attn_gate.weight"], P[p + "attn.attn_gate.bias"]))
            if state["v0"] is None:
                state["v0"] = raw_v
            x = x + P[p + "attn_scale"] * a
            return x + P[p + "mlp_scale"] * mlp(rms(x), P[p + "mlp.fc.weight"], P[p + "mlp.proj.weight"])
        return f

    x = unet(x, [block(i) for i in range(L // 2)], [block(i) for i in range(L // 2, L)], P["skip_weights"])
    return softcap(rms(x) @ P["tok_emb.weight"].T)


# ---- PRs #1148, #1406, #1550: banks ----------------------------------------------------------------------------------

def banked_logits(raw_sd, ids, *, xsa_last_n=4, ve_layers=(9, 10), appended=(), inplace=None, parallel_start=None):
    """#1148 (appended=(), inplace None), #1406 (appended=(4, 5)), #1550 (inplace=(3, 5), parallel_start=7).

    Partial RoPE 16 (NTK above 1024), LN scale, XSA (projection) on the last ``xsa_last_n`` layers with V including
    the value embedding. #1550: virtual layers with [3..5] twice, the U-Net halves of the 14 virtual layers, only 5
    skip weights; from the first decoder layer >= 7 an attention lane and an isolated MLP lane, merged by m."""
    P = _params(raw_sd)
    T = ids.shape[1]
    cos, sin = record_rope(T, "r3_compiled", train_seq_len=1024, rd=16)
    x = x0 = embed(P, ids)
    qo, kv, up, down = P["qo_bank"], P["kv_bank"], P["mlp_up_bank"], P["mlp_down_bank"]
    ve_base = (P["ve_shared.embed.weight"][ids] @ P["ve_shared.proj.weight"].T) * P["ve_shared.scale"] \
        if "ve_shared.embed.weight" in P else None

    def attn(i, u):
        ve = ve_base * P[f"ve_layer_scales.{ve_layers.index(i)}"] if ve_base is not None and i in ve_layers else None
        W = (qo[i], kv[i], kv[L + i], qo[L + i], P[f"blocks.{i}.attn.q_gain"])
        return attention(u, W, cos, sin, ve=ve, xsa="projection" if i >= L - xsa_last_n else None)[0]

    def block(i):
        p, s = f"blocks.{i}.", 1.0 / math.sqrt(i + 1)

        def f(x):
            mix = P[p + "resid_mix"]
            x = mix[0] * x + mix[1] * x0
            x = x + P[p + "attn_scale"] * attn(i, rms(x) * s)
            return x + P[p + "mlp_scale"] * mlp(rms(x) * s, up[i], down[i])
        return f

    seq = list(range(L))
    if inplace is not None:
        a, b = inplace
        seq = list(range(a)) + list(range(a, b + 1)) * 2 + list(range(b + 1, L))
    n_enc = len(seq) // 2
    if parallel_start is None:
        x = unet(x, [block(i) for i in seq[:n_enc]], [block(i) for i in seq[n_enc:]], P["skip_weights"])
    else:
        x = _lanes_decoder(P, x, x0, seq, n_enc, block, attn, parallel_start)
    for i in appended:
        x = block(i)(x)
    return softcap(rms(x) @ P["tok_emb.weight"].T)


def _lanes_decoder(P, x, x0, seq, n_enc, block, attn, parallel_start):
    """#1550's _forward_layers, encoder and decoder."""
    skips = []
    for i in seq[:n_enc]:
        x = block(i)(x)
        skips.append(x)
    lane0 = lane1 = None
    for j, i in enumerate(seq[n_enc:]):
        if skips and j < P["skip_weights"].shape[0]:
            add = P["skip_weights"][j] * skips.pop()
            if lane0 is None:
                x = x + add
            else:
                lane0 = lane0 + add
        if i >= parallel_start and lane0 is None:
            lane0 = lane1 = x
        if lane0 is None:
            x = block(i)(x)
            continue
        p, s = f"blocks.{i}.", 1.0 / math.sqrt(i + 1)
        mix = P[p + "resid_mix"]
        a_in = mix[0] * lane0 + mix[1] * x0
        lane0 = a_in + P[p + "attn_scale"] * attn(i, rms(a_in) * s)
        lane1 = lane1 + P[p + "mlp_scale"] * mlp(rms(lane1) * s, P["mlp_up_bank"][i], P["mlp_down_bank"][i])
    if lane0 is None:
        return x
    m = P["lane_merge"]
    return m * lane0 + (1 - m) * lane1


# ---- PR #1499 -----------------------------------------------------------------------------------------------------

def pr1499_logits(raw_sd, ids, *, recur=True, recipe="r3_compiled"):
    """#1499: softmax value residual from block 0's raw V (blocks 1-10), 'XSA' as y − a_ii·v_i on the last 4,
    GPT-J parallel blocks from 7, MLP with hidden_gain, partial RoPE 16 without rescaling, then blocks 3, 4, 5
    once more (``recur``)."""
    P = _params(raw_sd)
    T = ids.shape[1]
    cos, sin = record_rope(T, recipe, train_seq_len=10 ** 9, rd=16)
    x = x0 = embed(P, ids)
    state = {"v0": None}

    def block(i):
        p, s = f"blocks.{i}.", 1.0 / math.sqrt(i + 1)

        def f(x):
            mix = P[p + "resid_mix"]
            x = mix[0] * x + mix[1] * x0
            W = tuple(P[p + n] for n in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                                         "attn.q_gain"))
            a, raw_v = attention(rms(x) * s, W, cos, sin, v0=state["v0"] if i > 0 else None, vr="softmax",
                                 lam=P.get(p + "attn.v_lambda"), xsa="diagonal" if i >= L - 4 else None)
            if i == 0:
                state["v0"] = raw_v
            m = lambda h: mlp(rms(h) * s, P[p + "mlp.fc.weight"], P[p + "mlp.proj.weight"], P[p + "mlp.hidden_gain"])
            if i >= 7:
                return x + P[p + "attn_scale"] * a + P[p + "mlp_scale"] * m(x)
            x = x + P[p + "attn_scale"] * a
            return x + P[p + "mlp_scale"] * m(x)
        return f

    x = unet(x, [block(i) for i in range(L // 2)], [block(i) for i in range(L // 2, L)], P["skip_weights"])
    for i in ((3, 4, 5) if recur else ()):
        x = block(i)(x)
    return softcap(rms(x) @ P["tok_emb.weight"].T)


# ---- record-format state dicts ---------------------------------------------------------------------------------------

def _rand(seed):
    g = torch.Generator().manual_seed(seed)
    return (lambda *s, std=1.0: torch.randn(*s, generator=g) * std,
            lambda *s, a=0.5, b=1.5: torch.rand(*s, generator=g) * (b - a) + a)


def _block_scalars(sd, n, u, i):
    p = f"blocks.{i}."
    sd[p + "attn.q_gain"] = u(H, a=1.0, b=5.0)
    sd[p + "attn_scale"] = u(D, a=0.2, b=0.8)
    sd[p + "mlp_scale"] = u(D, a=0.2, b=0.8)
    sd[p + "resid_mix"] = torch.stack((u(D, a=0.6, b=1.4), u(D, a=-0.5, b=0.5)))


def _common(n, u, with_bigram=True):
    sd = {"tok_emb.weight": n(V, D), "smear.gate": n(D), "skip_weights": u(L // 2, D, a=0.3, b=1.0)}
    if with_bigram:
        sd.update({"bigram.embed.weight": n(BIGRAM, BDIM), "bigram.proj.weight": n(D, BDIM, std=BDIM ** -0.5),
                   "bigram.scale": torch.tensor(0.3)})
    return sd


def _block_linears(n, p):
    """One block's attention and MLP matrices, in the scripts' names."""
    return {p + "attn.c_q.weight": n(D, D, std=D ** -0.5), p + "attn.c_k.weight": n(HKV * HD, D, std=D ** -0.5),
            p + "attn.c_v.weight": n(HKV * HD, D, std=D ** -0.5), p + "attn.proj.weight": n(D, D, std=D ** -0.5),
            p + "mlp.fc.weight": n(HID, D, std=D ** -0.5), p + "mlp.proj.weight": n(D, HID, std=HID ** -0.5)}


def pr490_state_dict(seed=0, prefix="_orig_mod."):
    """Random #490 weights in the script's names and saved dtypes (bf16 embeddings and attn_gate weight)."""
    n, u = _rand(seed)
    sd = _common(n, u)
    for i in range(L):
        p = f"blocks.{i}."
        sd.update(_block_linears(n, p))
        sd.update({p + "attn.attn_gate.weight": n(H, D, std=0.3).bfloat16(), p + "attn.attn_gate.bias": u(H, a=-1, b=2)})
        if i > 0:
            sd[p + "attn.vr_lambda"] = u(2, a=0.2, b=0.9)
        _block_scalars(sd, n, u, i)
    for k in ("tok_emb.weight", "bigram.embed.weight"):
        sd[k] = sd[k].bfloat16()
    return {prefix + k: v for k, v in sd.items()}


def pr1499_state_dict(seed=0, prefix=""):
    """Random #1499 weights (per layer, v_lambda on blocks 1-10, hidden_gain everywhere)."""
    n, u = _rand(seed)
    sd = _common(n, u)
    for i in range(L):
        p = f"blocks.{i}."
        sd.update(_block_linears(n, p))
        sd.update({p + "mlp.hidden_gain": u(HID, a=0.5, b=1.5)})
        if i > 0:
            sd[p + "attn.v_lambda"] = n(2)
        _block_scalars(sd, n, u, i)
    return {prefix + k: v for k, v in sd.items()}


def banked_early_state_dict(seed=0, prefix="", *, ve_dim=16, with_bigram=True, lanes=False):
    """Random #1148 / #1406 (bigram, VE) or #1550 (``lanes``, no bigram) weights: banks, ve_shared, lane_merge."""
    n, u = _rand(seed)
    sd = _common(n, u, with_bigram)
    sd.update({"qo_bank": n(2 * L, D, D, std=D ** -0.5), "kv_bank": n(2 * L, HKV * HD, D, std=D ** -0.5),
               "mlp_up_bank": n(L, HID, D, std=D ** -0.5), "mlp_down_bank": n(L, D, HID, std=HID ** -0.5),
               "ve_shared.embed.weight": n(V, ve_dim), "ve_shared.proj.weight": n(HKV * HD, ve_dim, std=ve_dim ** -0.5),
               "ve_shared.scale": torch.tensor(0.7), "ve_layer_scales.0": u(1), "ve_layer_scales.1": u(1)})
    if lanes:
        sd["lane_merge"] = torch.tensor(0.35)
    for i in range(L):
        _block_scalars(sd, n, u, i)
    return {prefix + k: v for k, v in sd.items()}
