"""Independent forwards of the two record families, written from the record scripts, for the converter tests.

Nothing here imports pgolf. Each forward reads a record-format state dict (the scripts' own key names, banks
included), computes in float64 and returns softcapped logits; only the RoPE tables are built the way each
record builds them (its bf16-cast ``inv_freq`` buffer, in eager mode or under torch.compile on CUDA).

- :func:`r3_logits`: the 2026-04-09 record (PR #1493): per-layer weights, GPT-J parallel blocks from layer 7,
  sigmoid-gated U-Net skips (``lerp``), loop [3..5] x3, XSA everywhere, RoPE scaled by ``train_seq_len``.
- :func:`banked_logits`: the 2026-04-27 lineage (PR #1855): banks, BOS-masked SmearGate on the raw embedding,
  SparseAttnGate with its scale, two lanes from layer 8, packed rows with the script's ``cu_seqlens``.

Small widths (d=64, 2 query heads of 32 dims, 1 KV head) keep T=2048 fast; the layer structure is the
records' own (11 layers, the default loop and parallel layouts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64
BOS = 1
L, D, H, HKV, HID, V = 11, 64, 2, 1, 128, 97
HD = D // H
RD = 16  # rotated dims per head, as the records (16 of 64 there, 16 of 32 here)


# ---- RoPE tables as each record computes them -------------------------------------------------------------------

def record_rope(T: int, recipe: str, train_seq_len: int = 2048, rd: int = RD) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float64 (T, rd/2) of a record's Rotary for a sequence of T tokens.

    recipe: 'r3_eager' (the 2026-04-09 script in eager mode: bf16 buffer, bf16 positions and products),
    'r3_compiled' (the same under torch.compile on CUDA: Inductor computes the angle in fp32 from the bf16
    buffer and stores cos/sin in bf16), 'banked' (2026-04-27: the bf16 buffer cast back to fp32, fp32 tables,
    no rescale), 'exact'.
    """
    buffer = 1.0 / 10000.0 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    if recipe.startswith("r3") and T > train_seq_len:  # the script recomputes a rescaled fp32 inv_freq
        new_base = 10000.0 * (T / train_seq_len) ** (rd / (rd - 2))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32),
                            1.0 / new_base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        return freqs.cos().to(F64), freqs.sin().to(F64)
    if recipe == "exact":
        freqs = torch.outer(torch.arange(T, dtype=F64), 10000.0 ** (-torch.arange(0, rd, 2, dtype=F64) / rd))
        return freqs.cos(), freqs.sin()
    buffer = buffer.bfloat16()  # GPT(h).bfloat16() casts the non-persistent buffer too
    if recipe == "r3_eager":
        freqs = torch.outer(torch.arange(T, dtype=torch.bfloat16), buffer)
        return freqs.cos().to(F64), freqs.sin().to(F64)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), buffer.float())
    if recipe == "r3_compiled":
        return freqs.cos().bfloat16().to(F64), freqs.sin().bfloat16().to(F64)
    assert recipe == "banked", recipe
    return freqs.cos().to(F64), freqs.sin().to(F64)


# ---- shared pieces ----------------------------------------------------------------------------------------------

def rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(F64).eps)


def rope(x, cos, sin):
    """NeoX halves on the first 2*cos.size(-1) dims of x (B, T, heads, HD)."""
    h = cos.shape[-1]
    c, s = cos[None, :, None], sin[None, :, None]
    a, b = x[..., :h], x[..., h:2 * h]
    return torch.cat((a * c + b * s, -a * s + b * c, x[..., 2 * h:]), dim=-1)


def record_cu_seqlens(ids_row, max_doc_len):
    """The 2026-04-27 script's cu_seqlens of a packed row: BOS starts (and 0), each cut every max_doc_len tokens."""
    starts = [0] + [p for p, t in enumerate(ids_row) if t == BOS and p > 0]
    bounds = starts + [len(ids_row)]
    cu = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cu.extend(range(a, b, max_doc_len))
    return cu + [len(ids_row)]


def allowed(T, cu):
    """(T, T) bool: causal and inside one cu segment; None (plain causal) when cu is None."""
    if cu is None:
        return None
    seg = torch.zeros(T, dtype=torch.long)
    for s in cu[1:-1]:
        seg[s:] += 1
    return torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, None] == seg[None, :])


def attention(u, wq, wk, wv, wo, gain, cos, sin, mask, xsa, gate=None):
    """GQA attention with q/k RMSNorm, partial RoPE, per-head gain, XSA and an optional (B, T, H) output gate."""
    B, T, _ = u.shape
    q = rms((u @ wq.T).view(B, T, H, HD))
    k = rms((u @ wk.T).view(B, T, HKV, HD))
    v = (u @ wv.T).view(B, T, HKV, HD)
    q, k = rope(q, cos, sin) * gain[:, None], rope(k, cos, sin)
    group = torch.arange(H) // (H // HKV)  # the KV head of each query head
    heads_first = [t[:, :, group].transpose(1, 2).contiguous() for t in (k, v)]
    y = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), *heads_first, attn_mask=mask,
                                       is_causal=mask is None).transpose(1, 2)  # (B, T, H, HD)
    if xsa:  # remove the component along the token's own value vector
        vhat = v[:, :, group] / v[:, :, group].norm(dim=-1, keepdim=True)
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    if gate is not None:
        y = y * gate[..., None]
    return y.reshape(B, T, D) @ wo.T


def mlp(u, up, down):
    p = u @ up.T
    return (torch.where(p > 0, p, 0.5 * p) ** 2) @ down.T


def layer_order(looping, loop=(3, 5), n_loops=2):
    seq = list(range(L)) if not looping else \
        list(range(loop[0])) + list(range(loop[0], loop[1] + 1)) * (n_loops + 1) + list(range(loop[1] + 1, L))
    return seq[:len(seq) // 2], seq[len(seq) // 2:]


def softcap(z, cap=30.0):
    return cap * torch.tanh(z / cap)


# ---- the 2026-04-09 record --------------------------------------------------------------------------------------

def r3_logits(raw_sd, ids, *, looping=True, recipe="r3_compiled", train_seq_len=2048):
    """Logits (B, T, V) float64 of the 2026-04-09 record's forward_logits on ids (B, T)."""
    P = {k.removeprefix("_orig_mod.").removeprefix("module."): v.to(F64) for k, v in raw_sd.items()}
    T = ids.shape[1]
    cos, sin = record_rope(T, recipe, train_seq_len)
    mask = allowed(T, None)
    x = x0 = rms(P["tok_emb.weight"][ids])
    enc, dec = layer_order(looping)

    def block(i, x):
        p = f"blocks.{i}."
        mix = P[p + "resid_mix"]
        x_in = mix[0] * x + mix[1] * x0
        s = 1.0 / math.sqrt(i + 1)
        a = P[p + "attn_scale"] * attention(rms(x_in) * s, P[p + "attn.c_q.weight"], P[p + "attn.c_k.weight"],
                                            P[p + "attn.c_v.weight"], P[p + "attn.proj.weight"],
                                            P[p + "attn.q_gain"], cos, sin, mask, xsa=True)
        if i >= 7:  # GPT-J parallel: the MLP reads x_in too
            return x_in + a + P[p + "mlp_scale"] * mlp(rms(x_in) * s, P[p + "mlp.fc.weight"], P[p + "mlp.proj.weight"])
        h = x_in + a
        return h + P[p + "mlp_scale"] * mlp(rms(h) * s, P[p + "mlp.fc.weight"], P[p + "mlp.proj.weight"])

    skips = []
    for i in enc:
        x = block(i, x)
        skips.append(x)
    for j, i in enumerate(dec):
        if j < P["skip_weights"].shape[0] and skips:
            scaled = P["skip_weights"][j] * skips.pop()
            x = torch.lerp(scaled, x, torch.sigmoid(P["skip_gates"][j]))
        x = block(i, x)
    return softcap(rms(x) @ P["tok_emb.weight"].T)


# ---- the 2026-04-27 lineage ---------------------------------------------------------------------------------------

def banked_logits(raw_sd, ids, *, looping=True, gate_scale=0.5, cu=None, parallel_start=8):
    """Logits (B, T, V) float64 of the 2026-04-27 record's forward_logits; ``cu``: the script's cu_seqlens list.

    The head gate follows the tensors: ``attn_gate_w`` (H, 12) SparseAttnGate, (H, D) GATED_ATTN, or
    ``attn_gate_proj.weight`` ATTN_OUT_GATE (source 'proj').
    """
    P = {k.removeprefix("_orig_mod.").removeprefix("module."): v.to(F64) for k, v in raw_sd.items()}
    T = ids.shape[1]
    cos, sin = record_rope(T, "banked")
    mask = allowed(T, cu)
    x = P["tok_emb.weight"][ids]
    g = P["smear_lambda"] * torch.sigmoid(x[:, 1:, :12] @ P["smear_gate.weight"].T)  # (B, T-1, 1)
    not_bos = (ids[:, 1:] != BOS).to(F64).unsqueeze(-1)
    x = torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1] * not_bos], dim=1)
    x = x0 = rms(x)
    qo, kv, up, down = P["qo_bank"], P["kv_bank"], P["mlp_up_bank"], P["mlp_down_bank"]

    def head_gate(i, u):
        if f"blocks.{i}.attn.attn_gate_proj.weight" in P:
            return 2.0 * torch.sigmoid(u[..., :12] @ P[f"blocks.{i}.attn.attn_gate_proj.weight"].T)
        w = P[f"blocks.{i}.attn.attn_gate_w"]
        if w.shape[1] == D:
            return torch.sigmoid(u @ w.T)
        return torch.sigmoid(gate_scale * (u[..., :12] @ w.T))

    def attn(i, u):
        gate = head_gate(i, u)
        return attention(u, qo[i], kv[i], kv[L + i], qo[L + i], P[f"blocks.{i}.attn.q_gain"], cos, sin, mask,
                         xsa=True, gate=gate)

    def scales(i):
        p = f"blocks.{i}."
        return P[p + "resid_mix"], P[p + "attn_scale"], P[p + "mlp_scale"], 1.0 / math.sqrt(i + 1)

    def block(i, x):
        mix, a_s, m_s, s = scales(i)
        x_in = mix[0] * x + mix[1] * x0
        h = x_in + a_s * attn(i, rms(x_in) * s)
        return h + m_s * mlp(rms(h) * s, up[i], down[i])

    def lanes_block(i, lane0, lane1):
        mix, a_s, m_s, s = scales(i)
        a = a_s * attn(i, rms(mix[0] * lane0 + mix[1] * x0) * s)
        m = m_s * mlp(rms(lane1) * s, up[i], down[i])
        r, post = P["parallel_resid_lambdas"][i], P["parallel_post_lambdas"][i]
        return (r[0] * lane0 + post[0][0] * a + post[1][0] * m,
                r[1] * lane1 + post[0][1] * a + post[1][1] * m)

    enc, dec = layer_order(looping)
    skips = []
    for i in enc:
        x = block(i, x)
        skips.append(x)
    lane0 = lane1 = None
    for j, i in enumerate(dec):
        has_skip = j < P["skip_weights"].shape[0] and skips
        if i >= parallel_start > 0:
            if lane0 is None:
                lane0 = lane1 = x
            if has_skip:
                lane0 = torch.lerp(P["skip_weights"][j] * skips.pop(), lane0, torch.sigmoid(P["skip_gates"][j]))
            lane0, lane1 = lanes_block(i, lane0, lane1)
        else:
            if has_skip:
                x = torch.lerp(P["skip_weights"][j] * skips.pop(), x, torch.sigmoid(P["skip_gates"][j]))
            x = block(i, x)
    if lane0 is not None:
        x = 0.5 * (lane0 + lane1)
    cap = float(P["softcap_pos"]) if "softcap_pos" in P else 30.0
    return softcap(rms(x) @ P["tok_emb.weight"].T, cap)


# ---- record-format state dicts ----------------------------------------------------------------------------------

def _rand(g):
    def n(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def u(*shape, a=0.5, b=1.5):
        return torch.rand(*shape, generator=g) * (b - a) + a
    return n, u


def r3_state_dict(seed=0, prefix="_orig_mod.", dtype=torch.bfloat16, n_skip=8):
    """Random 2026-04-09-format weights (per-layer names), all in ``dtype`` under ``prefix``."""
    n, u = _rand(torch.Generator().manual_seed(seed))
    sd = {"tok_emb.weight": n(V, D)}
    for i in range(L):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = n(D, D, std=D ** -0.5)
        sd[p + "attn.c_k.weight"] = n(HKV * HD, D, std=D ** -0.5)
        sd[p + "attn.c_v.weight"] = n(HKV * HD, D, std=D ** -0.5)
        sd[p + "attn.proj.weight"] = n(D, D, std=D ** -0.5)
        sd[p + "attn.q_gain"] = u(H, a=3.0, b=6.0)
        sd[p + "mlp.fc.weight"] = n(HID, D, std=D ** -0.5)
        sd[p + "mlp.proj.weight"] = n(D, HID, std=HID ** -0.5)
        sd[p + "attn_scale"] = u(D, a=0.2, b=0.8)
        sd[p + "mlp_scale"] = u(D, a=0.2, b=0.8)
        sd[p + "resid_mix"] = torch.stack((u(D, a=0.6, b=1.4), u(D, a=-0.5, b=0.5)))
    sd["skip_weights"] = u(n_skip, D)
    sd["skip_gates"] = n(n_skip, D)
    return {prefix + k: v.to(dtype) for k, v in sd.items()}


def banked_state_dict(seed=0, prefix="", *, record_dtypes=False, asym=None, n_skip=8, gate="sparse"):
    """Random 2026-04-27-lineage weights under the script's names (banks, lanes, smear, head gates).

    ``record_dtypes``: as the script saves them (embedding bf16, the rest fp32); ``asym``: add the
    softcap_pos/softcap_neg pair of #1945 and later with these two values; ``gate``: 'sparse', 'gated'
    (GATED_ATTN_ENABLED) or 'attn_out' (ATTN_OUT_GATE_ENABLED).
    """
    n, u = _rand(torch.Generator().manual_seed(seed))
    sd = {"tok_emb.weight": n(V, D),
          "qo_bank": torch.cat([n(L, D, D, std=D ** -0.5), n(L, D, D, std=D ** -0.5)]),
          "kv_bank": n(2 * L, HKV * HD, D, std=D ** -0.5),
          "mlp_up_bank": n(L, HID, D, std=D ** -0.5), "mlp_down_bank": n(L, D, HID, std=HID ** -0.5),
          "skip_weights": u(n_skip, D), "skip_gates": n(n_skip, D),
          "parallel_resid_lambdas": u(L, 2, a=0.9, b=1.2), "parallel_post_lambdas": u(L, 2, 2, a=0.5, b=1.2),
          "smear_gate.weight": n(1, 12), "smear_lambda": u(1, a=0.5, b=1.0)}
    for i in range(L):
        p = f"blocks.{i}."
        sd[p + "attn.q_gain"] = u(H, a=3.0, b=6.0)
        sd[p + "attn_scale"] = u(D, a=0.2, b=0.8)
        sd[p + "mlp_scale"] = u(D, a=0.2, b=0.8)
        sd[p + "resid_mix"] = torch.stack((u(D, a=0.6, b=1.4), u(D, a=-0.5, b=0.5)))
        if gate == "attn_out":
            sd[p + "attn.attn_gate_proj.weight"] = n(H, 12)
        else:
            sd[p + "attn.attn_gate_w"] = n(H, 12 if gate == "sparse" else D, std=1.0 if gate == "sparse" else 0.2)
    if asym is not None:
        sd["softcap_pos"], sd["softcap_neg"] = torch.tensor(float(asym[0])), torch.tensor(float(asym[1]))
    if record_dtypes:
        sd["tok_emb.weight"] = sd["tok_emb.weight"].bfloat16()
    return {prefix + k: v for k, v in sd.items()}
