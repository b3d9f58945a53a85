"""Each model element of reference-stack section 2 against a direct float64 implementation of its formula.

``ref_hidden`` below is an independent forward written from the spec (2.2-2.10): it reads the model's
parameters by name and nothing else from the package. Each test builds a tiny config that isolates one element,
sets the parameters to random non-trivial values (many are zero/identity at init and would hide bugs), and
compares. Most tests also check that a plausible *wrong* variant of the formula (an "ablation" of the reference)
gives a clearly different result, so the comparison can fail.

Tolerances: the model builds its RoPE angles in fp32 (then casts), so anything that goes through attention
agrees to ~1e-6; paths that avoid attention agree to ~1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.model import GPT, GPTConfig, get_preset

F64 = torch.float64
EPS = torch.finfo(F64).eps
TIGHT = dict(rtol=1e-11, atol=1e-11)
ROPE_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 RoPE angles inside the model
DIFFERS = 1e-3  # an ablated reference must be at least this far from the model


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=97, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_hidden=64, rope_dims=8,
                rope_train_seq_len=0, qk_gain_init=2.0, xsa_last_n=0, ln_scale=False, skip_gates=True, num_loops=0,
                parallel_residual="none", smear_gate="none", attn_gate="none", bos_id=1)
    base.update(kw)
    return GPTConfig(**base)


def make_model(cfg: GPTConfig, seed: int | None = 0, **set_params) -> GPT:
    torch.manual_seed(1234)
    model = GPT(cfg).double()
    if seed is not None:
        randomize(model, seed)
    with torch.no_grad():
        for name, value in set_params.items():
            p = dict(model.named_parameters())[name.replace("__", ".")]
            p.copy_(torch.as_tensor(value, dtype=F64).expand_as(p))
    return model


def rand_ids(B, T, seed, vocab=97, lo=2):
    """Token ids without BOS (id 1) unless a test puts some in."""
    return torch.randint(lo, vocab, (B, T), generator=gen(seed))


@torch.no_grad()
def randomize(model: GPT, seed: int) -> None:
    """Every parameter to a random, non-trivial value (a parameter this does not know fails the test)."""
    g = gen(seed)

    def U(p, a, b):
        return torch.rand(p.shape, generator=g, dtype=F64) * (b - a) + a

    def N(p, std=1.0):
        return torch.randn(p.shape, generator=g, dtype=F64) * std

    for name, p in model.named_parameters():
        if name == "tok_emb.weight" or name.endswith("embed.weight"):
            v = N(p)
        elif name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "proj.weight", "fc.weight")):
            v = N(p, 1.0 / math.sqrt(p.shape[1]))
        elif name.endswith("q_gain"):
            v = U(p, 0.5, 2.5)
        elif name.endswith(("attn_scale", "mlp_scale")):
            v = U(p, 0.5, 1.5)
        elif name.endswith("resid_mix"):
            v = torch.stack((U(p[0], 0.6, 1.4), U(p[1], -0.6, 0.6)))
        elif name == "skip_weights":
            v = U(p, 0.5, 1.5)
        elif name in ("skip_gates", "smear_gate") or name.endswith("gate_w"):
            v = N(p)
        elif name == "lane_resid":
            v = U(p, 0.8, 1.2)
        elif name == "lane_mix":
            v = U(p, 0.3, 1.3)
        elif name in ("smear_lambda", "bigram.scale", "ve.scale"):
            v = U(p, 0.3, 0.9)
        elif name == "ve.layer_scales":
            v = U(p, 0.5, 1.5)
        else:
            raise AssertionError(f"randomize() does not know parameter {name!r}; extend the test")
        p.copy_(v)


def params(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().to(F64) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# The direct reference (spec section 2). `ab` holds names of deliberate mistakes ("ablations") used to show that
# a comparison is able to fail.

def rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def rope_theta(T, rd, base, train_len, ab=()):
    if train_len and T > train_len and "no_ntk" not in ab:
        base = base * (T / train_len) ** (rd / (rd - 2))
    j = torch.arange(rd // 2, dtype=F64)
    inv_freq = base ** (-2.0 * j / rd)
    return torch.arange(T, dtype=F64)[:, None] * inv_freq[None, :]  # (T, rd/2)


def apply_rope(x, theta, ab=()):
    """(a, b) = (x_j, x_{j+r/2}) → (a cosθ + b sinθ, −a sinθ + b cosθ); dims ≥ r untouched."""
    half = theta.shape[-1]
    c = torch.cos(theta)[None, :, None, :]
    s = torch.sin(theta)[None, :, None, :]
    out = x.clone()
    if "rope_interleaved" in ab:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * c + b * s
        out[..., 1:2 * half:2] = -a * s + b * c
        return out
    if "rope_reverse" in ab:
        s = -s
    a, b = x[..., :half], x[..., half:2 * half]
    out[..., :half] = a * c + b * s
    out[..., half:2 * half] = -a * s + b * c
    return out


def causal_attention(q, k, v, ab=()):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if "gqa_modulo" in ab:
        idx = torch.arange(H) % Hkv
    else:
        idx = torch.arange(H) // (H // Hkv)
    kr, vr = k[:, :, idx], v[:, :, idx]
    scale = 1.0 if "no_attn_scale" in ab else 1.0 / math.sqrt(D)
    sc = torch.einsum("bthd,bshd->bhts", q, kr) * scale
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    sc = sc.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(sc, -1), vr), vr


def ref_attention(P, cfg, i, u, theta, ve=None, ab=(), s=1.0):
    """Attention of physical layer i on its normalized input u (B, T, d) → (B, T, d), before α."""
    pre = f"blocks.{i}.attn."
    B, T, d = u.shape
    H, Hkv = cfg.num_heads, cfg.num_kv_heads
    D = d // H
    q = (u @ P[pre + "c_q.weight"].T).view(B, T, H, D)
    k = (u @ P[pre + "c_k.weight"].T).view(B, T, Hkv, D)
    v = u @ P[pre + "c_v.weight"].T
    if ve is not None:
        v = v + ve
    v = v.view(B, T, Hkv, D)
    if "qk_norm_joint" in ab:
        q = rms(q.reshape(B, T, d)).view(B, T, H, D)
        k = rms(k.reshape(B, T, Hkv * D)).view(B, T, Hkv, D)
    elif "no_qk_norm" not in ab:
        q, k = rms(q), rms(k)
    q, k = apply_rope(q, theta, ab), apply_rope(k, theta, ab)
    if "no_gain" not in ab:
        q = q * P[pre + "q_gain"][:, None]
    y, vr = causal_attention(q, k, v, ab)
    xsa = i >= cfg.num_layers - cfg.xsa_last_n
    if "xsa_all" in ab:
        xsa = True
    if "xsa_none" in ab:
        xsa = False
    if xsa:
        vhat = vr / vr.norm(dim=-1, keepdim=True)
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    if cfg.attn_gate != "none" and "no_gate" not in ab:
        W = P[pre + "gate_w"]
        if "gate_reads_unscaled" in ab:
            u = u / s
        if cfg.attn_gate == "gated":
            g = torch.sigmoid(u @ W.T)
        else:
            z = u[..., :cfg.attn_gate_width] @ W.T
            g = torch.sigmoid(cfg.attn_gate_kappa * z) if cfg.attn_gate == "sparse" else 2 * torch.sigmoid(z)
        y = y * g[..., None]
    return y.reshape(B, T, d) @ P[pre + "proj.weight"].T


def ref_mlp(P, cfg, i, u, ab=()):
    pre = f"blocks.{i}.mlp."
    p = u @ P[pre + "fc.weight"].T
    s = 0.0 if "relu2" in ab else cfg.mlp_negative_slope
    return (torch.where(p > 0, p, s * p) ** 2) @ P[pre + "proj.weight"].T


def ln_s(cfg, i, virtual, ab):
    if not cfg.ln_scale or "no_ln" in ab:
        return 1.0
    return 1.0 / math.sqrt((virtual if "ln_virtual" in ab else i) + 1)


def ref_block(P, cfg, i, x, x0, ctx, virtual, ab=()):
    pre = f"blocks.{i}."
    m = P[pre + "resid_mix"]
    x_in = x if "no_mix" in ab else m[0] * x + m[1] * x0
    s = ln_s(cfg, i, virtual, ab)
    u = rms(x_in) * s
    a = P[pre + "attn_scale"] * ref_attention(P, cfg, i, u, ctx["theta"], ctx["ve"].get(i), ab, s)
    gptj = cfg.parallel_residual == "gptj" and i >= cfg.parallel_start
    if "sequential" in ab:
        gptj = False
    if "gptj_all" in ab:
        gptj = True
    if gptj:
        return x_in + a + P[pre + "mlp_scale"] * ref_mlp(P, cfg, i, u, ab)
    h = x_in + a
    return h + P[pre + "mlp_scale"] * ref_mlp(P, cfg, i, rms(h) * s, ab)


def ref_two_lane(P, cfg, i, lane0, lane1, x0, ctx, virtual, ab=()):
    pre = f"blocks.{i}."
    m = P[pre + "resid_mix"]
    s = ln_s(cfg, i, virtual, ab)
    attn_in = m[0] * lane0 + m[1] * x0
    mlp_in = m[0] * lane1 + m[1] * x0 if "mlp_reads_mixed" in ab else lane1
    A = P[pre + "attn_scale"] * ref_attention(P, cfg, i, rms(attn_in) * s, ctx["theta"], ctx["ve"].get(i), ab, s)
    M = P[pre + "mlp_scale"] * ref_mlp(P, cfg, i, rms(mlp_in) * s, ab)
    r, Pm = P["lane_resid"][i], P["lane_mix"][i]
    return (r[0] * lane0 + Pm[0, 0] * A + Pm[1, 0] * M,
            r[1] * lane1 + Pm[0, 1] * A + Pm[1, 1] * M)


def ref_plan(cfg, looping):
    L = cfg.num_layers
    if looping and cfg.num_loops > 0:
        seq = list(range(cfg.loop_start)) + list(range(cfg.loop_start, cfg.loop_end + 1)) * (cfg.num_loops + 1) \
            + list(range(cfg.loop_end + 1, L))
    else:
        seq = list(range(L))
    n = len(seq) // 2
    return seq[:n], seq[n:]


def ref_num_skips(cfg):
    enc, dec = ref_plan(cfg, looping=cfg.num_loops > 0)
    return min(len(enc), len(dec))


def bigram_buckets(ids, Vb, bos, reset_at_bos=True, ab=()):
    out = torch.empty_like(ids)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            cur = int(ids[b, t])
            if t == 0 or (reset_at_bos and cur == bos):
                out[b, t] = Vb - 1
            else:
                prev = int(ids[b, t - 1])
                if "bigram_swapped" in ab:
                    cur, prev = prev, cur
                out[b, t] = ((36313 * cur) ^ (27191 * prev)) % (Vb - 1)
    return out


def ref_embed(P, cfg, ids, ab=()):
    """Input path 2.2: x0 (B, T, d)."""
    e = P["tok_emb.weight"][ids]
    if cfg.bigram_buckets:
        h = bigram_buckets(ids, cfg.bigram_buckets, cfg.bos_id, ab=ab)
        e = e + P["bigram.scale"] * (P["bigram.embed.weight"][h] @ P["bigram.proj.weight"].T)
    notbos = (ids != cfg.bos_id).to(F64)
    if "no_bos_mask" in ab:
        notbos = torch.ones_like(notbos)
    if cfg.smear_gate == "bos":
        w, lam = P["smear_gate"], P["smear_lambda"]
        src = e[:, :-1] if "smear_gate_reads_prev" in ab else e[:, 1:]
        gate = torch.sigmoid(src[..., :cfg.smear_width] @ w)
        e = torch.cat((e[:, :1], e[:, 1:] + (lam * gate * notbos[:, 1:])[..., None] * e[:, :-1]), dim=1)
    x = rms(e)
    if cfg.smear_gate == "vector":
        g = torch.sigmoid(P["smear_gate"])
        gt = g * notbos[:, 1:, None]
        x = torch.cat((x[:, :1], (1 - gt) * x[:, 1:] + gt * x[:, :-1]), dim=1)
    return x


def ref_hidden(P, cfg, ids, looping=False, ab=()):
    """Final normalized hidden (B, T, d) of the whole model."""
    B, T = ids.shape
    x = x0 = ref_embed(P, cfg, ids, ab)
    rd = cfg.rope_dims or cfg.model_dim // cfg.num_heads
    if "rope_all_dims" in ab:
        rd = cfg.model_dim // cfg.num_heads
    ve = {}
    if cfg.value_embed_dim:
        base = P["ve.scale"] * (P["ve.embed.weight"][ids] @ P["ve.proj.weight"].T)
        for slot, layer in enumerate(cfg.value_embed_layers):
            if "ve_wrong_layer" in ab:
                layer = (layer + 1) % cfg.num_layers
            ve[layer] = P["ve.layer_scales"][slot] * base
    ctx = dict(theta=rope_theta(T, rd, cfg.rope_base, cfg.rope_train_seq_len, ab), ve=ve)
    enc, dec = ref_plan(cfg, looping)
    n_skip = ref_num_skips(cfg)
    skips = []
    virtual = 0
    for i in enc:
        x = ref_block(P, cfg, i, x, x0, ctx, virtual, ab)
        virtual += 1
        skips.append(x)

    def blend(j, cur, s):
        w = P["skip_weights"][j]
        if not cfg.skip_gates or "skip_additive" in ab:
            return cur + w * s
        g = torch.sigmoid(P["skip_gates"][j])
        if "skip_gate_swapped" in ab:
            return (1 - g) * cur + g * (w * s)
        return g * cur + (1 - g) * (w * s)

    lanes = None
    for j, i in enumerate(dec):
        two = cfg.parallel_residual == "two_lane" and i >= cfg.parallel_start
        if two and lanes is None and "skip_before_split" not in ab:
            lanes = [x, x]  # spec 2.7: lanes start at the first such layer, then the skip goes into lane0 only
        if j < n_skip and skips:
            s = skips.pop(0) if "skip_fifo" in ab else skips.pop()
            if lanes is None:
                x = blend(j, x, s)
            elif "skip_both_lanes" in ab:
                lanes = [blend(j, lanes[0], s), blend(j, lanes[1], s)]
            else:
                lanes[0] = blend(j, lanes[0], s)
        if two and lanes is None:
            lanes = [x, x]
        if two:
            lanes = list(ref_two_lane(P, cfg, i, lanes[0], lanes[1], x0, ctx, virtual, ab))
        else:
            assert lanes is None, "a sequential layer after two-lane ones is outside the spec"
            x = ref_block(P, cfg, i, x, x0, ctx, virtual, ab)
        virtual += 1
    if lanes is not None:
        x = lanes[0] if "final_lane0" in ab else 0.5 * (lanes[0] + lanes[1])
    return rms(x)


def ref_logits(P, cfg, ids, looping=False, ab=()):
    z = ref_hidden(P, cfg, ids, looping, ab) @ P["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


def check(model, ids, tol, ablations=(), looping=None):
    """model.hidden == ref_hidden; each ablated reference differs from it by more than DIFFERS."""
    cfg = model.config
    looping = model.looping_active if looping is None else looping
    model.looping_active = looping
    P = params(model)
    with torch.no_grad():
        got = model.hidden(ids)
    want = ref_hidden(P, cfg, ids, looping)
    torch.testing.assert_close(got, want, **tol)
    for ab in ablations:
        wrong = ref_hidden(P, cfg, ids, looping, ab=(ab,) if isinstance(ab, str) else ab)
        gap = (got - wrong).abs().max().item()
        assert gap > DIFFERS, f"ablation {ab!r} is indistinguishable from the model (gap {gap:.2e})"
    return got


# ---------------------------------------------------------------------------------------------------------------
# 2.2 / 2.9: RMSNorm, embedding, head

def test_weightless_rmsnorm_and_identity_at_init():
    """At init every block, gate, smear and bigram is the identity, so hidden = RMSNorm(E[x]) (sota-like config)."""
    cfg = make_cfg(num_layers=5, model_dim=32, num_loops=2, loop_start=1, loop_end=2, parallel_residual="two_lane",
                   parallel_start=3, smear_gate="bos", attn_gate="sparse", xsa_last_n=5, ln_scale=True,
                   bigram_buckets=31, bigram_dim=16)
    model = make_model(cfg, seed=None)
    assert not [n for n, _ in model.named_parameters() if "norm" in n]  # RMSNorm has no weight
    ids = rand_ids(2, 23, seed=1)
    ids[0, 9] = cfg.bos_id
    for looping in (False, True):
        model.looping_active = looping
        with torch.no_grad():
            h = model.hidden(ids)
        e = model.tok_emb.weight.detach()[ids]
        want = e / torch.sqrt((e * e).mean(-1, keepdim=True) + EPS)
        torch.testing.assert_close(h, want, **TIGHT)
        torch.testing.assert_close((h * h).mean(-1), torch.ones(2, 23, dtype=F64), **TIGHT)
    # the norm is scale-invariant (no learnable gain, eps negligible)
    with torch.no_grad():
        model.tok_emb.weight.mul_(7.0)
        torch.testing.assert_close(model.hidden(ids), h, **TIGHT)


def test_tied_head_softcap_and_fp32_mean_ce():
    cfg = make_cfg(num_layers=2, xsa_last_n=1)
    model = make_model(cfg, seed=2)
    with torch.no_grad():
        model.tok_emb.weight.mul_(6.0)  # |z| > 30 for some logits, so the cap is in its non-linear range
    ids = rand_ids(2, 17, seed=3)
    tgt = rand_ids(2, 17, seed=4, lo=0)
    assert [n for n, p in model.named_parameters() if p.shape == (97, 32)] == ["tok_emb.weight"]  # tied
    with torch.no_grad():
        h = model.hidden(ids)
        logits = model.forward_logits(ids)
        z = h @ model.tok_emb.weight.T
        assert z.abs().max() > 45
        want = 30.0 * torch.tanh(z / 30.0)
        torch.testing.assert_close(logits, want, **TIGHT)
        assert logits.abs().max() < 30.0
        torch.testing.assert_close(logits, ref_logits(params(model), cfg, ids), **ROPE_TOL)
        nll = torch.logsumexp(want, -1) - want.gather(-1, tgt[..., None]).squeeze(-1)
        mean = model.loss(ids, tgt)
        assert mean.dtype == torch.float32 and mean.ndim == 0
        torch.testing.assert_close(mean.double(), nll.mean(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(ids, tgt), mean)
        per_tok = model.loss(ids, tgt, reduction="none")
        assert per_tok.shape == (2, 17) and per_tok.dtype == torch.float32
        torch.testing.assert_close(per_tok.double(), nll, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(model.loss(ids, tgt, reduction="sum").double(), nll.sum(), rtol=1e-6, atol=1e-4)
        # the uncapped CE is far away (the test can see a missing cap)
        plain = torch.logsumexp(z, -1) - z.gather(-1, tgt[..., None]).squeeze(-1)
        assert (plain.mean() - mean.double()).abs() > 0.1
    with pytest.raises(ValueError, match="reduction"):
        model.loss(ids, tgt, reduction="avg")


# ---------------------------------------------------------------------------------------------------------------
# 2.4 attention

def test_qk_rmsnorm_per_head():
    cfg = make_cfg(num_heads=4, num_kv_heads=2, model_dim=32, rope_dims=4)
    model = make_model(cfg, seed=5)
    ids = rand_ids(2, 19, seed=6)
    got = check(model, ids, ROPE_TOL, ablations=["no_qk_norm", "qk_norm_joint"])
    # per head: rescaling one head's rows of Wq / Wk changes nothing (a joint norm over heads would)
    with torch.no_grad():
        model.blocks[0].attn.c_q.weight[8:16].mul_(9.0)
        model.blocks[0].attn.c_k.weight[:8].mul_(0.2)
        torch.testing.assert_close(model.hidden(ids), got, rtol=1e-12, atol=1e-12)


def test_partial_rope_first_16_of_64_dims():
    cfg = make_cfg(model_dim=128, num_heads=2, num_kv_heads=1, mlp_hidden=64, rope_dims=16)
    model = make_model(cfg, seed=7)
    ids = rand_ids(1, 29, seed=8)
    check(model, ids, ROPE_TOL, ablations=["rope_all_dims", "rope_interleaved", "rope_reverse"])


def test_rotary_angles_match_formula():
    cfg = make_cfg(model_dim=128, num_heads=2, rope_dims=16)
    model = make_model(cfg, seed=None)
    cos, sin = model.rotary(40, torch.device("cpu"), F64)
    assert cos.shape == (1, 40, 1, 8)
    theta = torch.arange(40, dtype=F64)[:, None] * 10000.0 ** (-2.0 * torch.arange(8, dtype=F64) / 16)
    torch.testing.assert_close(cos[0, :, 0], torch.cos(theta), rtol=0, atol=5e-6)
    torch.testing.assert_close(sin[0, :, 0], torch.sin(theta), rtol=0, atol=5e-6)


def test_full_rope_when_rope_dims_zero():
    cfg = make_cfg(model_dim=32, num_heads=2, rope_dims=0)  # head_dim 16, all rotated
    model = make_model(cfg, seed=9)
    ids = rand_ids(2, 21, seed=10)
    check(model, ids, ROPE_TOL, ablations=["rope_interleaved", "rope_reverse"])
    # and differs from a partial rope of 8 dims
    P = params(model)
    with torch.no_grad():
        partial = ref_hidden(P, make_cfg(model_dim=32, num_heads=2, rope_dims=8), ids)
        assert (model.hidden(ids) - partial).abs().max() > DIFFERS


def test_ntk_base_rescale_beyond_train_len():
    cfg = make_cfg(rope_dims=8, rope_train_seq_len=16)
    model = make_model(cfg, seed=11)
    long_ids = rand_ids(1, 37, seed=12)
    check(model, long_ids, ROPE_TOL, ablations=["no_ntk"])  # T=37 > 16: base' = base·(37/16)^(8/6)
    cos, _ = model.rotary(37, torch.device("cpu"), F64)
    base = 10000.0 * (37 / 16) ** (8 / 6)
    theta = torch.arange(37, dtype=F64)[:, None] * base ** (-2.0 * torch.arange(4, dtype=F64) / 8)
    torch.testing.assert_close(cos[0, :, 0], torch.cos(theta), rtol=0, atol=5e-6)
    # T <= L_train: no rescale (and the cache does not serve stale angles)
    short = long_ids[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(short), ref_hidden(params(model), cfg, short), **ROPE_TOL)
        theta16 = torch.arange(16, dtype=F64)[:, None] * 10000.0 ** (-2.0 * torch.arange(4, dtype=F64) / 8)
        torch.testing.assert_close(model.rotary(16, torch.device("cpu"), F64)[0][0, :, 0], torch.cos(theta16),
                                   rtol=0, atol=5e-6)


def test_qk_gain_per_head():
    cfg = make_cfg(num_heads=4, num_kv_heads=2, rope_dims=4)
    model = make_model(cfg, seed=13, blocks__0__attn__q_gain=[0.5, 5.25, 2.0, 3.5])
    ids = rand_ids(2, 19, seed=14)
    check(model, ids, ROPE_TOL, ablations=["no_gain", "no_attn_scale"])
    assert model.blocks[0].attn.q_gain.dtype == F64  # (the model was .double()'d; fp32 by default)
    assert GPT(cfg).blocks[0].attn.q_gain.dtype == torch.float32


def test_xsa_on_last_n_layers_only():
    cfg = make_cfg(num_layers=3, xsa_last_n=2)  # layers 1, 2
    model = make_model(cfg, seed=15)
    ids = rand_ids(2, 17, seed=16)
    check(model, ids, ROPE_TOL, ablations=["xsa_all", "xsa_none"])
    cfg0 = make_cfg(num_layers=2, xsa_last_n=0)
    check(make_model(cfg0, seed=17), ids, ROPE_TOL, ablations=["xsa_all"])


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa(kv):
    cfg = make_cfg(num_heads=4, num_kv_heads=kv, rope_dims=4, xsa_last_n=1)
    model = make_model(cfg, seed=18 + kv)
    ids = rand_ids(2, 15, seed=19)
    check(model, ids, ROPE_TOL, ablations=["gqa_modulo"] if kv == 2 else [])
    assert model.blocks[0].attn.c_k.weight.shape == (kv * 8, 32)


# ---------------------------------------------------------------------------------------------------------------
# 2.3 / 2.5 block and MLP (attention switched off with α = 0 where it is not the subject: tight tolerances)

@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_mlp_leaky_relu_squared(slope):
    cfg = make_cfg(num_layers=2, mlp_negative_slope=slope)
    model = make_model(cfg, seed=20, blocks__0__attn_scale=0.0, blocks__1__attn_scale=0.0)
    ids = rand_ids(2, 13, seed=21)
    check(model, ids, TIGHT, ablations=["relu2"] if slope else [])


def test_resid_mix():
    cfg = make_cfg(num_layers=3)
    model = make_model(cfg, seed=22, **{f"blocks__{i}__attn_scale": 0.0 for i in range(3)})
    ids = rand_ids(2, 13, seed=23)
    check(model, ids, TIGHT, ablations=["no_mix"])
    # with attention on as well
    check(make_model(cfg, seed=24), ids, ROPE_TOL, ablations=["no_mix"])


def test_layerwise_ln_scale_uses_physical_layer_in_recurrent_passes():
    cfg = make_cfg(num_layers=3, ln_scale=True, num_loops=2, loop_start=1, loop_end=1)  # [0,1,1,1,2]
    model = make_model(cfg, seed=25)
    ids = rand_ids(2, 15, seed=26)
    check(model, ids, ROPE_TOL, ablations=["no_ln", "ln_virtual"], looping=True)
    check(model, ids, ROPE_TOL, ablations=["no_ln"], looping=False)


# ---------------------------------------------------------------------------------------------------------------
# 2.6 U-Net skips

@pytest.mark.parametrize("gates", [True, False])
def test_unet_skips_lifo(gates):
    cfg = make_cfg(num_layers=4, skip_gates=gates)  # enc [0, 1], dec [2, 3]
    model = make_model(cfg, seed=27)
    ids = rand_ids(2, 13, seed=28)
    abl = ["skip_fifo", "skip_gate_swapped", "skip_additive"] if gates else ["skip_fifo"]
    check(model, ids, ROPE_TOL, ablations=abl)
    assert (model.skip_gates is None) == (not gates)


def test_skip_params_sized_for_looped_layout_and_unused_rows():
    cfg = make_cfg(num_layers=6, num_loops=1, loop_start=1, loop_end=2)  # looped [0,1,2,1,2,3,4,5]
    model = make_model(cfg, seed=29)
    assert ref_num_skips(cfg) == 4 == model.skip_weights.shape[0] == model.skip_gates.shape[0]
    ids = rand_ids(1, 11, seed=30)
    check(model, ids, ROPE_TOL, looping=True)
    check(model, ids, ROPE_TOL, looping=False)  # enc [0,1,2], dec [3,4,5]: rows 0..2 used, row 3 unused
    R = torch.randn(1, 11, 32, generator=gen(300), dtype=F64)
    model.zero_grad()
    (model.hidden(ids) * R).sum().backward()
    g = model.skip_weights.grad
    assert (g[:3].abs().sum(-1) > 0).all() and (g[3] == 0).all()
    model.zero_grad()
    model.looping_active = True
    (model.hidden(ids) * R).sum().backward()
    assert (model.skip_weights.grad.abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# 2.7 parallel residuals

def test_gptj_parallel_from_parallel_start():
    cfg = make_cfg(num_layers=3, parallel_residual="gptj", parallel_start=1, ln_scale=True)
    model = make_model(cfg, seed=31)
    ids = rand_ids(2, 13, seed=32)
    check(model, ids, ROPE_TOL, ablations=["sequential", "gptj_all"])


def two_lane_model(seed, neutral_skip_steps):
    """6 layers, enc [0,1,2], dec [3,4,5], two lanes from layer 4 (decoder steps 1, 2).

    Skips of the listed decoder steps are made the identity (gate c = +40, σ(c) = 1 - 4e-18).
    """
    cfg = make_cfg(num_layers=6, parallel_residual="two_lane", parallel_start=4, ln_scale=True, xsa_last_n=2)
    model = make_model(cfg, seed=seed)
    with torch.no_grad():
        for j in neutral_skip_steps:
            model.skip_gates[j].fill_(40.0)
    return model


def test_two_lane_lanes():
    """lane init, attention reads m0·lane0 + m1·x0, MLP reads lane1 unmixed, r/P updates, mean of lanes."""
    model = two_lane_model(33, neutral_skip_steps=[1, 2])
    ids = rand_ids(2, 15, seed=34)
    check(model, ids, ROPE_TOL, ablations=["mlp_reads_mixed", "final_lane0"])
    assert model.lane_resid.shape == (6, 2) and model.lane_mix.shape == (6, 2, 2)


def test_two_lane_skip_goes_to_lane0_on_later_lane_layers():
    model = two_lane_model(35, neutral_skip_steps=[1])  # real skip at decoder step 2 (layer 5)
    ids = rand_ids(2, 15, seed=36)
    check(model, ids, ROPE_TOL, ablations=["skip_both_lanes"])


def test_two_lane_skip_at_first_lane_layer_goes_to_lane0_only():
    model = two_lane_model(37, neutral_skip_steps=[])  # real skips at decoder steps 0, 1 (first lane layer), 2
    ids = rand_ids(2, 15, seed=38)
    check(model, ids, ROPE_TOL, ablations=["skip_before_split"])


# ---------------------------------------------------------------------------------------------------------------
# 2.8 depth recurrence

def test_layer_plan():
    c = get_preset("sota").model  # loop [3, 5], num_loops 2, 11 layers
    assert c.layer_plan(True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert c.layer_plan(False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert c.num_skips == 8
    r2 = c.replace(loop_start=4, loop_end=5)  # R2: loop [4, 5] x3
    assert r2.layer_plan(True) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert r2.num_skips == 7
    assert get_preset("baseline").model.layer_plan(True) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])
    assert get_preset("baseline").model.num_skips == 4
    for L, ls, le, nl in [(5, 1, 2, 2), (4, 0, 3, 1), (7, 6, 6, 3), (3, 1, 1, 0)]:
        cfg = make_cfg(num_layers=L, loop_start=ls, loop_end=le, num_loops=nl)
        for looping in (False, True):
            assert cfg.layer_plan(looping) == tuple(ref_plan(cfg, looping))


def test_depth_recurrence_shared_weights():
    cfg = make_cfg(num_layers=5, num_loops=2, loop_start=1, loop_end=2, ln_scale=True, xsa_last_n=3)
    model = make_model(cfg, seed=39)
    ids = rand_ids(2, 13, seed=40)
    n_params = model.num_params()
    assert len(model.blocks) == 5
    assert not model.looping_active  # off until training switches it on
    plain = check(model, ids, ROPE_TOL, looping=False)
    looped = check(model, ids, ROPE_TOL, looping=True)
    assert (plain - looped).abs().max() > DIFFERS
    assert model.num_params() == n_params
    # the same block weights serve every pass: they get gradient from all of them
    model.zero_grad()
    model.hidden(ids).pow(3).sum().backward()
    g_loop = model.blocks[1].attn.c_v.weight.grad.clone()
    w = model.blocks[1].attn.c_v.weight
    # finite-difference check of the gradient along one direction (includes all three passes of layer 1)
    d = torch.randn(w.shape, generator=gen(41), dtype=F64)
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * d)
        up = model.hidden(ids).pow(3).sum()
        w.sub_(2 * eps * d)
        down = model.hidden(ids).pow(3).sum()
        w.add_(eps * d)
    torch.testing.assert_close((g_loop * d).sum(), (up - down) / (2 * eps), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 2.2 input path: SmearGate (BOS-safe and vector), BigramHash. Blocks stay at init (identity), so the hidden
# state is RMSNorm of the input path and the comparison is exact.

def input_path_model(cfg, seed, names):
    """Init model (identity blocks) with only the named parameters (and E) randomized."""
    model = make_model(cfg, seed=None)
    other = make_model(cfg, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "tok_emb.weight" or any(n.startswith(k) for k in names):
                p.copy_(dict(other.named_parameters())[n])
    return model


def test_smear_gate_bos():
    cfg = make_cfg(num_layers=2, smear_gate="bos", attn_gate="sparse", xsa_last_n=2)
    ids = rand_ids(2, 21, seed=42)
    ids[0, 7] = ids[1, 12] = ids[1, 13] = cfg.bos_id
    # identity at init
    model = make_model(cfg, seed=None)
    assert (model.smear_gate == 0).all() and model.smear_lambda.item() == 0 and model.smear_gate.shape == (12,)
    with torch.no_grad():
        e = model.tok_emb.weight[ids]
        torch.testing.assert_close(model.hidden(ids), rms(e), **TIGHT)
    model = input_path_model(cfg, 43, ["smear_"])
    check(model, ids, TIGHT, ablations=["no_bos_mask", "smear_gate_reads_prev"])
    # and with the blocks randomized too
    check(make_model(cfg, seed=44), ids, ROPE_TOL, ablations=["no_bos_mask"])


def test_smear_gate_vector():
    cfg = make_cfg(num_layers=1, smear_gate="vector")
    ids = rand_ids(2, 17, seed=45)
    ids[1, 5] = cfg.bos_id
    model = input_path_model(cfg, 46, ["smear_gate"])
    assert model.smear_gate.shape == (32,)
    got = check(model, ids, TIGHT, ablations=["no_bos_mask"])
    # position 0 (and the BOS position) keep their own normalized embedding
    e = model.tok_emb.weight.detach()[ids]
    torch.testing.assert_close(got[:, 0], rms(e[:, 0]), **TIGHT)
    torch.testing.assert_close(got[1, 5], rms(e[1, 5]), **TIGHT)


def test_bigram_hash():
    cfg = make_cfg(num_layers=1, bigram_buckets=31, bigram_dim=16)
    model = make_model(cfg, seed=None)
    assert (model.bigram.embed.weight == 0).all() and (model.bigram.proj.weight == 0).all()
    assert model.bigram.scale.item() == pytest.approx(0.05)
    assert model.bigram.embed.weight.shape == (31, 16) and model.bigram.proj.weight.shape == (32, 16)
    ids = rand_ids(2, 19, seed=47, lo=0)
    ids[ids == cfg.bos_id] = 0
    model = input_path_model(cfg, 48, ["bigram."])
    check(model, ids, TIGHT, ablations=["bigram_swapped"])
    # the hash itself, from the formula: h = (36313·x_t XOR 27191·x_{t−1}) mod (Vb−1), position 0 → Vb−1
    x = [5, 96, 0, 17, 17, 64]
    want = [30] + [((36313 * x[t]) ^ (27191 * x[t - 1])) % 30 for t in range(1, 6)]
    assert bigram_buckets(torch.tensor([x]), 31, 1, reset_at_bos=False)[0].tolist() == want
    with torch.no_grad():
        model.bigram.embed.weight.copy_(torch.eye(31, 16, dtype=F64) * 0 + torch.arange(31, dtype=F64)[:, None])
        model.bigram.proj.weight.zero_()
        model.bigram.proj.weight[0, 0] = 1.0
        model.bigram.scale.fill_(1.0)
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[:, 1] = 1.0  # so the norm keeps channel 0 readable: hidden[...,0]/hidden[...,1] = bucket
        h = model.hidden(torch.tensor([x]))
    assert torch.round(h[0, :, 0] / h[0, :, 1]).long().tolist() == want


def test_value_embeddings():
    cfg = make_cfg(num_layers=3, value_embed_dim=8, value_embed_layers=(1, 2))
    model0 = make_model(cfg, seed=None)
    assert (model0.ve.proj.weight == 0).all() and model0.ve.scale.item() == pytest.approx(0.1)
    assert (model0.ve.layer_scales == 1).all() and model0.ve.proj.weight.shape == (16, 8)
    model = make_model(cfg, seed=49)
    ids = rand_ids(2, 15, seed=50)
    check(model, ids, ROPE_TOL, ablations=["ve_wrong_layer"])


# ---------------------------------------------------------------------------------------------------------------
# 2.4.7 head-output gates

@pytest.mark.parametrize("kind,kappa", [("sparse", 0.5), ("sparse", 1.0), ("attn_out", 0.5), ("gated", 0.5)])
def test_attention_head_gates(kind, kappa):
    # layer 1 with ln_scale on: the gate reads u = RMSNorm(x_in)·s_l, s_1 = 1/√2
    cfg = make_cfg(num_layers=2, num_heads=4, num_kv_heads=2, rope_dims=4, attn_gate=kind, attn_gate_kappa=kappa,
                   ln_scale=True, xsa_last_n=1)
    model = make_model(cfg, seed=51)
    ids = rand_ids(2, 15, seed=52)
    check(model, ids, ROPE_TOL, ablations=["no_gate", "gate_reads_unscaled"])
    width = 32 if kind == "gated" else 12
    assert model.blocks[0].attn.gate_w.shape == (4, width)


def test_attention_gate_values_at_init():
    for kind, value in (("sparse", 0.5), ("attn_out", 1.0)):
        cfg = make_cfg(num_heads=4, num_kv_heads=2, attn_gate=kind)
        model = make_model(cfg, seed=None)
        assert (model.blocks[0].attn.gate_w == 0).all()
        u = torch.randn(2, 5, 32, generator=gen(53), dtype=F64)
        torch.testing.assert_close(model.blocks[0].attn.head_gate(u), torch.full((2, 5, 4), value, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# whole model, everything on

def test_full_sota_like_model_matches_reference():
    cfg = make_cfg(num_layers=5, model_dim=48, num_heads=4, num_kv_heads=2, mlp_hidden=96, rope_dims=8,
                   num_loops=2, loop_start=1, loop_end=2, parallel_residual="two_lane", parallel_start=3,
                   smear_gate="bos", attn_gate="sparse", xsa_last_n=5, ln_scale=True, bigram_buckets=31,
                   bigram_dim=16, qk_gain_init=5.0)
    model = make_model(cfg, seed=54)
    ids = rand_ids(2, 23, seed=55)
    ids[0, 11] = cfg.bos_id
    check(model, ids, ROPE_TOL, looping=True)  # looped: dec [2,1,2,3,4]; first two-lane layer 3 takes a skip
    check(model, ids, ROPE_TOL, looping=False)  # non-looped: enc [0,1], dec [2,3,4]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), ref_logits(params(model), cfg, ids), **ROPE_TOL)


# ---------------------------------------------------------------------------------------------------------------
# 2.11 initialization

def test_record_init():
    cfg = GPTConfig(vocab_size=97, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                    rope_dims=8, num_loops=1, loop_start=1, loop_end=1, parallel_start=2, xsa_last_n=3,
                    qk_gain_init=5.25, tied_embed_init_std=0.005, smear_gate="bos", attn_gate="sparse")
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():
        assert p.dtype == torch.float32
    for i, blk in enumerate(model.blocks):
        for W in (blk.attn.c_q.weight, blk.attn.c_k.weight, blk.attn.c_v.weight, blk.mlp.fc.weight):
            W = W.detach().double()
            gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
            torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), rtol=0, atol=1e-5)
        assert (blk.attn.proj.weight == 0).all() and (blk.mlp.proj.weight == 0).all()
        assert (blk.attn.gate_w == 0).all()
        assert (blk.attn.q_gain == 5.25).all() and blk.attn.q_gain.shape == (4,)
        assert (blk.attn_scale == 1).all() and (blk.mlp_scale == 1).all()
        assert (blk.resid_mix[0] == 1).all() and (blk.resid_mix[1] == 0).all()
    # different blocks get different orthogonal matrices
    assert (model.blocks[0].attn.c_q.weight - model.blocks[1].attn.c_q.weight).abs().max() > 0.01
    assert (model.skip_weights == 1).all() and (model.skip_gates == 0).all()
    assert (model.lane_resid == 1.1).all() and (model.lane_mix == 1).all()
    assert (model.smear_gate == 0).all() and model.smear_lambda.item() == 0
    assert not model.looping_active


def test_embedding_init_statistics():
    cfg = make_cfg(vocab_size=512, model_dim=64, num_heads=4, num_kv_heads=2, tied_embed_init_std=0.005)
    torch.manual_seed(1)
    E = GPT(cfg).tok_emb.weight.detach().double().flatten()  # 32768 samples
    n = E.numel()
    assert abs(E.mean().item()) < 4 * 0.005 / math.sqrt(n)
    assert E.std().item() == pytest.approx(0.005, rel=0.03)
    within = (E.abs() < 0.005).double().mean().item()  # normal: P(|z| < 1) = 0.6827
    assert within == pytest.approx(0.6827, abs=0.02)
    # the std follows the config
    torch.manual_seed(2)
    E2 = GPT(cfg.replace(tied_embed_init_std=0.02)).tok_emb.weight.detach().double()
    assert E2.std().item() == pytest.approx(0.02, rel=0.03)


def test_gated_and_value_embedding_init_statistics():
    cfg = make_cfg(vocab_size=512, model_dim=64, num_heads=8, num_kv_heads=4, attn_gate="gated",
                   value_embed_dim=32, value_embed_layers=(0,))
    torch.manual_seed(3)
    model = GPT(cfg)
    gw = model.blocks[0].attn.gate_w.detach().double()  # 8 x 64 ~ N(0, 0.01²)
    assert gw.std().item() == pytest.approx(0.01, rel=0.15)
    ve = model.ve.embed.weight.detach().double()  # 512 x 32 ~ N(0, 0.01²)
    assert ve.std().item() == pytest.approx(0.01, rel=0.05)


def test_baseline_init():
    cfg = get_preset("baseline").model.replace(vocab_size=97, model_dim=64, mlp_hidden=128, num_layers=2)
    torch.manual_seed(4)
    model = GPT(cfg)
    for blk in model.blocks:
        W = blk.attn.c_q.weight.detach().double()
        bound = 1 / math.sqrt(64)  # PyTorch Linear default: U(-1/√in, 1/√in)
        assert W.abs().max() <= bound and W.abs().max() > 0.9 * bound
        assert (W @ W.T - torch.eye(64, dtype=F64)).abs().max() > 0.1  # not orthogonal
        assert (blk.attn.proj.weight == 0).all() and (blk.mlp.proj.weight == 0).all()
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)


# ---------------------------------------------------------------------------------------------------------------
# dtypes: fp32 master weights, bf16 autocast compute, fp32 loss (2.1, 2.9, 2.11)

def test_bf16_autocast_compute_with_fp32_weights_and_loss():
    cfg = make_cfg(num_layers=3, num_heads=4, num_kv_heads=2, rope_dims=4, smear_gate="bos", attn_gate="sparse",
                   xsa_last_n=3, ln_scale=True, parallel_residual="two_lane", parallel_start=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    randomize(model, 56)
    ids = rand_ids(2, 21, seed=57)
    tgt = rand_ids(2, 21, seed=58, lo=0)
    with torch.no_grad():
        full = model.loss(ids, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.forward_logits(ids)
            low = model.loss(ids, tgt)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert full.dtype == torch.float32 and low.dtype == torch.float32
    assert logits.dtype == torch.float32  # the head GEMM in bf16, the softcap in fp32 as the loss does
    assert abs(low.item() - full.item()) < 0.05 * full.item()
    assert abs(low.item() - full.item()) > 0  # it really ran in lower precision


def test_config_validation_messages():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        make_cfg(model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="rope_dims"):
        make_cfg(rope_dims=7)
    with pytest.raises(ValueError, match="loop segment"):
        make_cfg(num_layers=3, num_loops=1, loop_start=2, loop_end=3)
    with pytest.raises(ValueError, match="parallel_residual='lanes'"):
        make_cfg(parallel_residual="lanes")
    cfg = make_cfg(value_embed_dim=8, value_embed_layers=(0,))
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
