"""The record-stack GPT (reference-stack section 2) in lean PyTorch.

Token ids (B, T) → tied embedding (+ optional BigramHash, SmearGate) → RMSNorm → a U-Net of blocks over a
virtual layer sequence (depth recurrence reuses physical layers, in place or appended after the last layer) →
RMSNorm → tied head with logit softcap. Each block: residual mix with x0, attention (GQA, q/k RMSNorm, partial
RoPE, QK-gain, value residual, XSA, head gate) and a LeakyReLU(0.5)² MLP (optionally with a gain per hidden unit),
sequential, GPT-J parallel, two-lane parallel or with an isolated MLP lane. The hot ops (attention, MLP, head +
loss) go through :mod:`pgolf.kernels`, which picks Triton or the PyTorch reference per device; the one variant no
kernel implements (diagonal XSA) runs the reference and says so once.

Packed batches: ``cu_seqlens`` (B = 1) marks where independent sequences start (documents, or evaluation
windows laid side by side); attention and every token shift (SmearGate, BigramHash) reset there and at BOS
(``token_shift='row'``, the 2026-03/04 records: token shifts reset at sequence starts only).
With ``max_seqlen`` the model also cuts attention every ``max_seqlen`` tokens inside a sequence, as the records'
loaders split long documents, while the token shifts carry on across those cuts: the previous token still
belongs to the same document (the 2026-04-27 record masks its shift only at BOS).
Parameter names follow the 2026-04-09 record script (``blocks.3.attn.c_q.weight`` ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf import kernels
from pgolf.model.config import GPTConfig

MUON_SUFFIXES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                 "mlp.fc.weight", "mlp.proj.weight")
EMBED_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve.embed.weight")


class GPT(nn.Module):
    """The language model. Weights are stored fp32; compute follows the input/autocast dtype."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.model_dim)
        self.bigram = BigramHash(c.bigram_buckets, c.bigram_dim, c.model_dim) if c.bigram_buckets else None
        self.ve = ValueEmbedding(c.vocab_size, c.value_embed_dim, c.kv_dim, len(c.value_embed_layers)) \
            if c.value_embed_dim else None
        if c.smear_gate == "bos":
            self.smear_gate = nn.Parameter(torch.zeros(c.smear_width))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        elif c.smear_gate == "vector":
            self.smear_gate = nn.Parameter(torch.full((c.model_dim,), float(c.smear_init)))
        self.blocks = nn.ModuleList([Block(c, i) for i in range(c.num_layers)])
        self.skip_weights = nn.Parameter(torch.ones(c.num_skips, c.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(c.num_skips, c.model_dim)) if c.skip_gates else None
        if c.parallel_residual == "two_lane":
            self.lane_resid = nn.Parameter(torch.full((c.num_layers, 2), c.lane_resid_init))
            self.lane_mix = nn.Parameter(torch.ones(c.num_layers, 2, 2))
        elif c.parallel_residual == "mlp_lane":
            self.lane_merge = nn.Parameter(torch.tensor(0.5))
        self.looping_active = False
        self._rope_cache: dict = {}
        self.temperature = 1.0  # divides the softcapped logits (eval/TTT of #490 and #1499: 0.98); not a weight
        self.reset_parameters()

    # ---- forward ------------------------------------------------------------------------------------------
    def loss(self, input_ids: Tensor, target_ids: Tensor, *, cu_seqlens: Tensor | None = None,
             max_seqlen: int | None = None, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the softcapped logits (fp32). input_ids, target_ids: (B, T) int64.

        reduction 'mean' → scalar; 'sum' → scalar; 'none' → (B, T) per-token NLL in nats.
        """
        h = self.hidden(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        per_tok = self._head_loss(h.reshape(-1, h.size(-1)), target_ids.reshape(-1))
        if reduction == "none":
            return per_tok.view_as(target_ids)
        if reduction == "sum":
            return per_tok.sum()
        if reduction == "mean":
            return per_tok.mean()
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    forward = loss

    def forward_logits(self, input_ids: Tensor, *, cu_seqlens: Tensor | None = None,
                       max_seqlen: int | None = None) -> Tensor:
        """Softcapped logits (B, T, V), as the loss computes them: the head GEMM in the compute dtype, the softcap in
        fp32 (or fp64 for an fp64 model), divided by ``temperature``."""
        h = self.hidden(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        z = F.linear(h, self.tok_emb.weight.to(h.dtype))
        z = kernels.softcap(z.float() if z.dtype in (torch.bfloat16, torch.float16) else z, self.config.logit_softcap)
        return z if self.temperature == 1.0 else z / self.temperature

    def hidden(self, input_ids: Tensor, *, cu_seqlens: Tensor | None = None,
               max_seqlen: int | None = None) -> Tensor:
        """Final normalized hidden states (B, T, d): everything before the head."""
        return rms_norm(self.trunk(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))

    def rows_nll(self, trunk_rows: Tensor, target_ids: Tensor) -> Tensor:
        """Per-row NLL (N,) fp32 of trunk outputs (N, d): the final norm, the tied head and the softcapped CE.

        Every op here is row-wise, so ``rows_nll(trunk(x)[rows], y[rows])`` equals ``loss(x, y, 'none')[rows]``:
        eval gathers the positions it scores first and pays the head for those rows only."""
        return self._head_loss(rms_norm(trunk_rows), target_ids)

    def _head_loss(self, h: Tensor, target_ids: Tensor) -> Tensor:
        """CE of softcap(h Eᵀ)/T per row: cap·tanh(z/cap)/T is (cap/T)·tanh((z/T)/(cap/T)), so the temperature is
        the head on h/T with the cap divided by T (one fused kernel either way)."""
        t = self.temperature
        if t == 1.0:
            return kernels.lm_head_loss(h, self.tok_emb.weight, target_ids, self.config.logit_softcap)
        return kernels.lm_head_loss(h / t, self.tok_emb.weight, target_ids, self.config.logit_softcap / t)

    def trunk(self, input_ids: Tensor, *, cu_seqlens: Tensor | None = None,
              max_seqlen: int | None = None) -> Tensor:
        """The residual stream after the last block (B, T, d), before the final norm."""
        c = self.config
        B, T = input_ids.shape
        # (B, T) bool: no token shift into these (BOS counts only for token_shift='document')
        start = segment_starts(input_ids, cu_seqlens, c.bos_id if c.token_shift == "document" else None)
        e = self.tok_emb(input_ids)
        if torch.is_autocast_enabled(e.device.type):
            e = e.to(torch.get_autocast_dtype(e.device.type))
        if self.bigram is not None:
            e = e + self.bigram(input_ids, start).to(e.dtype)
        if c.smear_gate == "bos":
            gate = torch.sigmoid(e[..., : c.smear_width] @ self.smear_gate.to(e.dtype))  # (B, T)
            e = e + (self.smear_lambda.to(e.dtype) * gate * (~start).to(e.dtype)).unsqueeze(-1) * shift_right(e)
        x = rms_norm(e)
        if c.smear_gate == "vector":
            x = self._smear_vector(x, start)
        x0 = x
        rope = self.rotary(T, x.device, x.dtype)
        ve = self.ve(input_ids).to(x.dtype) if self.ve is not None else None
        if cu_seqlens is not None and max_seqlen is not None:
            cu_seqlens = attention_segments(cu_seqlens, T, max_seqlen)
        vres = {} if c.value_residual != "none" else None  # layer 0's v, for every later pass (recurrence too)
        ctx = dict(x0=x0, rope=rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, ve=ve, vres=vres)

        enc, dec = c.layer_plan(self.looping_active)
        skips = []
        for i in enc:
            x = self.blocks[i](x, **ctx)
            skips.append(x)
        if c.parallel_residual == "mlp_lane":
            return self._decode_mlp_lane(x, dec, skips, ctx)
        lanes: tuple[Tensor, Tensor] | None = None
        for j, i in enumerate(dec):
            two_lane = c.parallel_residual == "two_lane" and i >= c.parallel_start
            if two_lane and lanes is None:
                lanes = (x, x)  # the first two-lane layer splits the stream before its skip arrives
            if j < c.num_skips and skips:
                s = skips.pop()
                if lanes is None:
                    x = self._skip(j, x, s)
                else:  # the U-Net skip blends into lane0 only
                    lanes = (self._skip(j, lanes[0], s), lanes[1])
            if two_lane:
                lanes = self._two_lane(i, lanes, **ctx)
            else:
                if lanes is not None:  # a sequential layer after two-lane ones: merge the lanes first
                    x, lanes = 0.5 * (lanes[0] + lanes[1]), None
                x = self.blocks[i](x, **ctx)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return x

    def _smear_vector(self, x: Tensor, start: Tensor) -> Tensor:
        """R1's per-channel SmearGate (1 − g)·x + g·x_{t−1}. At a start, 'document' leaves x as it is and 'row'
        mixes in zeros, (1 − g)·x, as the 2026-03/04 records do. x: (B, T, d); start: (B, T) bool."""
        g = torch.sigmoid(self.smear_gate.to(x.dtype))
        keep = (~start).to(x.dtype).unsqueeze(-1)
        if self.config.token_shift == "row":
            return (1 - g) * x + g * (shift_right(x) * keep)
        g = g * keep
        return (1 - g) * x + g * shift_right(x)

    def _decode_mlp_lane(self, x: Tensor, dec: list[int], skips: list[Tensor], ctx: dict) -> Tensor:
        """PR #1550's decoder: from the first layer >= parallel_start the stream splits into an attention lane and an
        isolated MLP lane; a skip arriving at that layer joins both (it is added before the split), later skips
        join the attention lane; the output is m·lane0 + (1 − m)·lane1 with one learned scalar m."""
        c = self.config
        lanes: tuple[Tensor, Tensor] | None = None
        for j, i in enumerate(dec):
            if j < c.num_skips and skips:
                if lanes is None:
                    x = self._skip(j, x, skips.pop())
                else:
                    lanes = (self._skip(j, lanes[0], skips.pop()), lanes[1])
            if lanes is None and i >= c.parallel_start:
                lanes = (x, x)
            if lanes is None:
                x = self.blocks[i](x, **ctx)
            else:
                lanes = self.blocks[i].mlp_lane(lanes, **ctx)
        if lanes is None:
            return x
        m = self.lane_merge.to(lanes[0].dtype)
        return m * lanes[0] + (1 - m) * lanes[1]

    def _skip(self, j: int, x: Tensor, s: Tensor) -> Tensor:
        scaled = self.skip_weights[j].to(x.dtype) * s
        if self.skip_gates is None:
            return x + scaled
        g = torch.sigmoid(self.skip_gates[j].to(x.dtype))
        return g * x + (1 - g) * scaled

    def _two_lane(self, i: int, lanes: tuple[Tensor, Tensor], *, x0: Tensor, **ctx) -> tuple[Tensor, Tensor]:
        blk = self.blocks[i]
        lane0, lane1 = lanes
        mix = blk.resid_mix.to(lane0.dtype)
        a = blk.attn_branch(mix[0] * lane0 + mix[1] * x0, **ctx)
        m = blk.mlp_branch(lane1)
        r = self.lane_resid[i].to(lane0.dtype)
        P = self.lane_mix[i].to(lane0.dtype)
        return (r[0] * lane0 + P[0, 0] * a + P[1, 0] * m,
                r[1] * lane1 + P[0, 1] * a + P[1, 1] * m)

    def rotary(self, T: int, device, dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (1, T, 1, rope_dims/2), for buffer positions 0..T-1 (cached)."""
        key = (T, str(device), dtype)
        if key not in self._rope_cache:
            cos, sin = rope_tables(self.config, T, device)
            self._rope_cache = {key: (cos[None, :, None, :].to(dtype), sin[None, :, None, :].to(dtype))}
        return self._rope_cache[key]

    # ---- parameters ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of reference-stack 2.11 (or PyTorch's Linear default for init='baseline')."""
        c = self.config
        nn.init.normal_(self.tok_emb.weight, std=c.tied_embed_init_std)
        for blk in self.blocks:
            for lin in (blk.attn.c_q, blk.attn.c_k, blk.attn.c_v, blk.mlp.fc):
                if c.init == "record":
                    nn.init.orthogonal_(lin.weight, gain=1.0)
                else:
                    lin.reset_parameters()
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.mlp.proj.weight)
            if blk.attn.gate_w is not None:
                if c.attn_gate == "gated":
                    nn.init.normal_(blk.attn.gate_w, std=0.01)
                else:
                    nn.init.zeros_(blk.attn.gate_w)
        if self.bigram is not None and c.bigram_init_std > 0:
            nn.init.normal_(self.bigram.embed.weight, std=c.bigram_init_std)
        for aux in (self.bigram, self.ve):
            if aux is not None and c.aux_proj_init != "zeros" and min(aux.proj.weight.shape) >= 64:
                nn.init.orthogonal_(aux.proj.weight, gain=1.0)
                if c.aux_proj_init == "orthogonal_scaled":
                    aux.proj.weight.mul_(1.0 / math.sqrt(2 * c.num_layers))

    def optimizer_groups(self, aux_to_muon: bool = False) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters split into 'muon' (block matrices), 'tok' (embedding tables) and 'scalar'.

        ``aux_to_muon``: the attention head-gate matrices and the BigramHash projection go to Muon too (PR #490 and
        #1499 do this; otherwise they are in the AdamW 'scalar' group)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "tok": [], "scalar": []}
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and name.endswith(MUON_SUFFIXES):
                groups["muon"].append((name, p))
            elif aux_to_muon and p.ndim == 2 and (name.endswith(".attn.gate_w") or name == "bigram.proj.weight"):
                groups["muon"].append((name, p))
            elif name in EMBED_NAMES:
                groups["tok"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_fake_quant(self, targets: dict[str, int] | None, *, floor: bool = False, in_eval: bool = False) -> None:
        """Late QAT's switch: the Linear layers named in ``targets`` fake-quantize at their bit widths (see
        :class:`Linear`), every other Linear stops; None or {} turns it off everywhere."""
        linears = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
        unknown = sorted(set(targets or {}) - set(linears))
        if unknown:
            raise ValueError(f"fake-quant targets that are not Linear layers of the model: {unknown}")
        for name, mod in linears.items():
            bits = (targets or {}).get(name)
            mod.fake_quant = (int(bits), bool(floor), bool(in_eval)) if bits else None

    def fake_quant_targets(self) -> dict[str, int]:
        """{module name: bits} of the Linear layers that fake-quantize now (late QAT)."""
        return {n: m.fake_quant[0] for n, m in self.named_modules() if isinstance(m, Linear) and m.fake_quant}

    def kernel_fallbacks(self) -> list[str]:
        """The layers whose ops have no Triton kernel and always run the PyTorch reference, one line each."""
        c = self.config
        diag = [b.layer for b in self.blocks if b.attn.use_xsa and c.xsa_mode == "diagonal"]
        return [f"attention: diagonal XSA (y - a_ii v_i) has no Triton kernel; layers {diag} run the reference"] \
            if diag else []


class Block(nn.Module):
    """One physical layer: resid_mix, attention and MLP with per-channel output scales."""

    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn = Attention(c, layer)
        self.mlp = MLP(c)
        self.attn_scale = nn.Parameter(torch.ones(c.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(c.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(c.model_dim), torch.zeros(c.model_dim))))
        self.ln_scale = 1.0 / math.sqrt(layer + 1) if c.ln_scale else 1.0
        self.gptj = c.parallel_residual == "gptj" and layer >= c.parallel_start

    def attn_branch(self, x_in: Tensor, **ctx) -> Tensor:
        """α ⊙ Attn(RMSNorm(x_in)·s_l). x_in: (B, T, d)."""
        return self.attn_scale.to(x_in.dtype) * self.attn(rms_norm(x_in) * self.ln_scale, **ctx)

    def mlp_branch(self, h: Tensor) -> Tensor:
        """β ⊙ MLP(RMSNorm(h)·s_l). h: (B, T, d)."""
        return self.mlp_scale.to(h.dtype) * self.mlp(rms_norm(h) * self.ln_scale)

    def forward(self, x: Tensor, *, x0: Tensor, **ctx) -> Tensor:
        """Sequential or GPT-J parallel block. x, x0: (B, T, d) → (B, T, d)."""
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        if self.gptj:
            return x_in + self.attn_branch(x_in, **ctx) + self.mlp_branch(x_in)
        h = x_in + self.attn_branch(x_in, **ctx)
        return h + self.mlp_branch(h)

    def mlp_lane(self, lanes: tuple[Tensor, Tensor], *, x0: Tensor, **ctx) -> tuple[Tensor, Tensor]:
        """PR #1550's parallel layer: attention on lane0 (resid-mixed with x0), the MLP on lane1 alone."""
        lane0, lane1 = lanes
        mix = self.resid_mix.to(lane0.dtype)
        a_in = mix[0] * lane0 + mix[1] * x0
        return a_in + self.attn_branch(a_in, **ctx), lane1 + self.mlp_branch(lane1)


class Attention(nn.Module):
    """GQA attention with q/k RMSNorm, partial RoPE, per-head QK-gain, XSA and an optional head gate."""

    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.c = c
        self.c_q = Linear(c.model_dim, c.model_dim)
        self.c_k = Linear(c.model_dim, c.kv_dim)
        self.c_v = Linear(c.model_dim, c.kv_dim)
        self.proj = Linear(c.model_dim, c.model_dim)
        self.q_gain = nn.Parameter(torch.full((c.num_heads,), float(c.qk_gain_init)))
        self.layer = layer
        self.use_xsa = layer >= c.num_layers - c.xsa_last_n
        width = c.model_dim if c.attn_gate in ("gated", "gated_bias") else c.attn_gate_width
        self.gate_w = nn.Parameter(torch.zeros(c.num_heads, width)) if c.attn_gate != "none" else None
        # PR #490's gate: Linear(d, H) with its bias, weight 0 and bias 4 at init (σ(4) ≈ 0.98)
        self.gate_b = nn.Parameter(torch.full((c.num_heads,), 4.0)) if c.attn_gate == "gated_bias" else None
        self.ve_slot = c.value_embed_layers.index(layer) if layer in c.value_embed_layers else None
        init = {"linear": (0.5, 0.5), "softmax": (0.95, 0.05)}.get(c.value_residual)
        self.vr_lambda = nn.Parameter(torch.tensor(init)) if init and layer > 0 else None

    def forward(self, u: Tensor, *, rope: tuple[Tensor, Tensor], cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, ve=None, vres: dict | None = None) -> Tensor:
        """u: (B, T, d) normalized input → (B, T, d) attention output after the out-projection.

        ``vres``: the forward's value-residual store (layer 0 puts its v there, later layers mix it in)."""
        c = self.c
        B, T, _ = u.shape
        q = self.c_q(u).view(B, T, c.num_heads, c.head_dim)
        k = self.c_k(u).view(B, T, c.num_kv_heads, c.head_dim)
        v = self.c_v(u)
        if ve is not None and self.ve_slot is not None:
            v = v + ve[self.ve_slot]
        v = v.view(B, T, c.num_kv_heads, c.head_dim)
        if vres is not None:
            v = self.value_residual(v, vres)
        q = apply_rope(rms_norm(q), *rope)
        k = apply_rope(rms_norm(k), *rope)
        q = q * self.q_gain.to(q.dtype)[:, None]
        if self.use_xsa and c.xsa_mode == "diagonal":
            y = kernels.reference_fallback("attention", "xsa_diagonal", q.device.type)(
                q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            y = kernels.attention(q, k, v, xsa=self.use_xsa, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if self.gate_w is not None:
            y = y * self.head_gate(u).unsqueeze(-1)
        return self.proj(y.reshape(B, T, c.model_dim))

    def value_residual(self, v: Tensor, vres: dict) -> Tensor:
        """Layer 0 stores its v (B, T, Hkv, D) as v0; a later layer returns its v mixed with v0 by its λ (2,):
        'linear' λ0·v0 + λ1·v (PR #490), 'softmax' s0·v + s1·v0 with s = softmax(λ) (#1499)."""
        if self.vr_lambda is None:
            if self.layer == 0 and "v0" not in vres:
                vres["v0"] = v
            return v
        v0 = vres["v0"]
        if self.c.value_residual == "linear":
            lam = self.vr_lambda.to(v.dtype)
            return lam[0] * v0 + lam[1] * v
        s = torch.softmax(self.vr_lambda, dim=0).to(v.dtype)
        return s[0] * v + s[1] * v0

    def head_gate(self, u: Tensor) -> Tensor:
        """Per-head output gate (B, T, H) from the normalized input u (B, T, d)."""
        c = self.c
        w = self.gate_w.to(u.dtype)
        if c.attn_gate == "gated":
            return torch.sigmoid(u @ w.t())
        if c.attn_gate == "gated_bias":
            return torch.sigmoid(u @ w.t() + self.gate_b.to(u.dtype))
        z = u[..., : c.attn_gate_width] @ w.t()
        if c.attn_gate == "sparse":
            return torch.sigmoid(c.attn_gate_kappa * z)
        return 2 * torch.sigmoid(z)  # attn_out


class MLP(nn.Module):
    """(LeakyReLU_s(u W1ᵀ)² ⊙ g) W2ᵀ through the kernel dispatch (``fused=False`` runs the modules one by one).

    g (hidden,) is #1499's per-unit ``hidden_gain`` (absent: 1); the fused kernel gets it folded into the
    down-projection, W2·diag(g), which is the same function."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = Linear(c.model_dim, c.mlp_hidden)
        self.proj = Linear(c.mlp_hidden, c.model_dim)
        self.hidden_gain = nn.Parameter(torch.ones(c.mlp_hidden)) if c.mlp_hidden_gain else None
        self.negative_slope = c.mlp_negative_slope
        self.fused = True

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., d) → (..., d)."""
        if self.fused and type(self.fc) is Linear and type(self.proj) is Linear:  # not swapped for int6 layers
            w2 = self.proj.train_weight()
            if self.hidden_gain is not None:
                w2 = w2 * self.hidden_gain.to(w2.dtype)
            return kernels.mlp(u, self.fc.train_weight(), w2, self.negative_slope)
        pre = self.fc(u)
        act = F.leaky_relu(pre, self.negative_slope) if self.negative_slope > 0 else F.relu(pre)
        h = act.square()
        if self.hidden_gain is not None:
            h = h * self.hidden_gain.to(h.dtype)
        return self.proj(h)


class Linear(nn.Linear):
    """Bias-free linear layer whose fp32 weight is cast to the input's dtype.

    ``fake_quant`` (set by late QAT, :mod:`pgolf.train.qat`): (bits, scale floor, also in eval) or None. While it
    applies (training mode, or always with the third flag) the forward uses the straight-through fake-quantized
    weight: per-row absmax scale s = max(absmax/Q, 1/Q if floor), round(w/s) clamped to ±Q, times s; the gradient
    passes to w unchanged."""

    fake_quant: tuple[int, bool, bool] | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.train_weight().to(x.dtype))

    def train_weight(self) -> Tensor:
        """The weight the forward uses (fp32): fake-quantized while late QAT applies, else the weight itself."""
        fq = self.fake_quant
        if fq is None or not (self.training or fq[2]):
            return self.weight
        return fake_quantize(self.weight, fq[0], fq[1])


class BigramHash(nn.Module):
    """R1's hashed bigram embedding: scale · P · T[h(x_{t-1}, x_t)], zero at init; segment starts use the last bucket."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = Linear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))
        nn.init.zeros_(self.embed.weight)
        nn.init.zeros_(self.proj.weight)

    def forward(self, ids: Tensor, start: Tensor) -> Tensor:
        """ids, start: (B, T) → (B, T, model_dim)."""
        h = torch.bitwise_xor(36313 * ids, 27191 * shift_right(ids)) % (self.buckets - 1)
        h = torch.where(start, torch.full_like(h, self.buckets - 1), h)
        return self.scale * self.proj(self.embed(h))


class ValueEmbedding(nn.Module):
    """R1's value embeddings: a shared table VE[x] → zero-init projection to kv_dim, × 0.1 × a per-layer scale."""

    def __init__(self, vocab: int, dim: int, kv_dim: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = Linear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.Parameter(torch.ones(n_layers))
        nn.init.normal_(self.embed.weight, std=0.01)
        nn.init.zeros_(self.proj.weight)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) → (n_layers, B, T, kv_dim)."""
        v = self.scale * self.proj(self.embed(ids))
        return self.layer_scales.to(v.dtype)[:, None, None, None] * v


# ---- functional helpers -----------------------------------------------------------------------------------

def fake_quantize(w: Tensor, bits: int, floor: bool) -> Tensor:
    """Straight-through fake quantization of w (rows, cols) on the records' per-row absmax grid (fp32 math):
    the value is q·s with s = absmax/Q (at least 1/Q with ``floor``), q = clamp(round(w/s), ±Q); d/dw is 1."""
    Q = 2 ** (bits - 1) - 1
    with torch.no_grad():
        s = w.float().abs().amax(dim=1, keepdim=True) / Q
        s = s.clamp_min(1.0 / Q) if floor else s.clamp_min(1e-12)
        wq = (torch.clamp(torch.round(w.float() / s), -Q, Q) * s).to(w.dtype)
    return w + (wq - w).detach()


def rms_norm(x: Tensor) -> Tensor:
    """Weightless RMSNorm over the last dim (eps = torch's default for the dtype)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2·cos.size(-1) dims of each head, NeoX halves: (a, b) → (a cos + b sin, −a sin + b cos).

    x: (B, T, H, D); cos, sin: (1, T, 1, r/2). Dims r..D pass through.
    """
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    return torch.cat((a * cos + b * sin, b * cos - a * sin, rest), dim=-1)


def rope_tables(c: GPTConfig, T: int, device=None) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin), each (T, r/2), for positions 0..T-1, computed as ``c.rope_tables`` says.

    With ``rope_train_seq_len`` and T above it, every record recomputes NTK-rescaled frequencies in fp32, so
    all modes give the exact tables there. Otherwise the records keep ``inv_freq`` in a buffer that their
    ``.bfloat16()`` cast rounds: 'bf16_freq' (2026-04-27 lineage) uses those frequencies with exact positions;
    'r3_compiled' (2026-04-09 under torch.compile on CUDA) also rounds cos/sin to bf16; 'r3_eager' (the same
    script run eagerly) rounds positions, angles and cos/sin to bf16 as well.
    """
    rd = c.rope_dims or c.head_dim
    exponents = torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd
    positions = torch.arange(T, dtype=torch.float32, device=device)
    if c.rope_train_seq_len and T > c.rope_train_seq_len:
        base = c.rope_base * (T / c.rope_train_seq_len) ** (rd / (rd - 2))
        return _cos_sin(torch.outer(positions, 1.0 / base ** exponents))
    inv_freq = 1.0 / c.rope_base ** exponents
    if c.rope_tables == "exact":
        return _cos_sin(torch.outer(positions, inv_freq))
    inv_freq = round_to_bf16(inv_freq)
    if c.rope_tables == "bf16_freq":
        return _cos_sin(torch.outer(positions, inv_freq))
    if c.rope_tables == "r3_compiled":
        return _cos_sin(torch.outer(positions, inv_freq), rounded=True)
    angles = round_to_bf16(torch.outer(round_to_bf16(positions), inv_freq))  # r3_eager
    return _cos_sin(angles, rounded=True)


def _cos_sin(angles: Tensor, rounded: bool = False) -> tuple[Tensor, Tensor]:
    """(cos, sin) of fp32 angles, each optionally rounded to the nearest bf16 value."""
    cos, sin = angles.cos(), angles.sin()
    return (round_to_bf16(cos), round_to_bf16(sin)) if rounded else (cos, sin)


def round_to_bf16(x: Tensor) -> Tensor:
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32, for finite x.

    Integer arithmetic on the bit pattern, so that no compiler can drop the rounding as it may drop a
    ``.to(bfloat16).float()`` round trip inside a fused kernel.
    """
    bits = x.contiguous().view(torch.int32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).view(torch.float32)


def attention_segments(cu_seqlens: Tensor, T: int, max_seqlen: int) -> Tensor:
    """Attention segment starts: each sequence of ``cu_seqlens`` cut every ``max_seqlen`` tokens from its start.

    cu_seqlens: int (K,) sequence starts of a packed row of T tokens, starting at 0, padded with T. Returns
    int32 (K + T // max_seqlen,), sorted and padded with T; no segment is longer than max_seqlen. The shape
    depends only on K, T and max_seqlen, so this traces under torch.compile(fullgraph=True).
    """
    cu = cu_seqlens.to(torch.long)
    pos = torch.arange(T, device=cu.device)
    seq_start = cu[(torch.searchsorted(cu, pos, right=True) - 1).clamp_min(0)]
    is_start = (pos - seq_start) % max_seqlen == 0
    n = cu.numel() + T // max_seqlen
    slot = torch.where(is_start, torch.cumsum(is_start, 0) - 1, n)
    out = torch.full((n + 1,), T, dtype=torch.int32, device=cu.device)
    return out.scatter(0, slot, pos.to(torch.int32))[:n]


def shift_right(x: Tensor) -> Tensor:
    """x[:, t-1] at position t (zeros at t = 0). x: (B, T, ...)."""
    return torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)


def segment_starts(ids: Tensor, cu_seqlens: Tensor | None, bos_id: int | None) -> Tensor:
    """(B, T) bool: position 0, every BOS token (unless ``bos_id`` is None) and every cu_seqlens sequence start
    (no token shift into these)."""
    start = ids == bos_id if bos_id is not None else torch.zeros_like(ids, dtype=torch.bool)
    start[:, 0] = True
    if cu_seqlens is not None:
        T = ids.shape[1]
        marks = torch.zeros(T + 1, dtype=torch.bool, device=ids.device)
        marks[cu_seqlens.to(device=ids.device, dtype=torch.long)] = True
        start = start | marks[:T].unsqueeze(0)
    return start
