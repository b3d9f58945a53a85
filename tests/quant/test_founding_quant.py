"""The founding records' quantization elements, each against its definition.

Scale rules (absmax and absmax with the 1/Q floor, SDClip with the floor, the int8 percentile clip, the
percentile search), GPTQ's ascending / no act-order and its plain-H⁻¹ updates (against a float64 column-by-column
implementation), magnitude pruning, selective ±1 pruning to a byte target, fp16 keeps, round-to-nearest embeddings
and tables, self-generated calibration sequences, and the artifact recording all of it.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT, GPTConfig
from pgolf.quant.artifact import build_model, decode, encode
from pgolf.quant.calibrate import collect_hessians, generated_batches
from pgolf.quant.gptq import dequantize, gptq_quantize, qmax
from pgolf.quant.prune import magnitude_prune, selective_prune
from pgolf.quant.quantize import QuantSettings, quantize_for_artifact, quantize_state
from pgolf.quant.scales import PERCENTILE, SEARCH_QUANTILES, quantize_rows, rule_scales, search_candidates
from tests.quant.test_gptq import correlated_hessian, weights


def test_absmax_and_floored_rules():
    W = weights(32, 128)
    W[4] = 0.0
    Q = qmax(6)
    s = rule_scales(W, "absmax", 6, 0.0)
    expect = (W.abs().amax(1) / Q).half()
    assert torch.equal(s[:4], expect[:4]) and s[4] == 1.0  # an all-zero row gets 1
    floored = rule_scales(W, "absmax_floor", 6, 0.0)
    assert torch.equal(floored, (W.abs().amax(1) / Q).clamp_min(1 / Q).half())
    assert (floored > s).sum() >= 30  # these 0.02-scale rows sit below the 1/31 floor, as the records' often did
    sd = rule_scales(W * 50, "sdclip_floor", 6, 12.85)
    assert torch.equal(sd, (12.85 * (W * 50).std(1) / Q).clamp_min(1 / Q).half())


def test_percentile_rule_clips_before_rounding():
    W = weights(16, 4096, seed=3)
    W[:, 0] = 0.5  # one outlier per row, just above the interpolated 99.99984th percentile, below the 1/127 floor
    q, s = quantize_rows(W, "percentile", 8, 0.0)
    clip = torch.quantile(W.abs(), PERCENTILE, dim=1)
    assert torch.equal(s, (clip / 127).clamp_min(1 / 127).half())
    clipped = torch.maximum(torch.minimum(W, clip[:, None]), -clip[:, None])
    assert torch.equal(q, torch.clamp(torch.round(clipped / s.float()[:, None]), -127, 127).to(torch.int8))
    unclipped = torch.clamp(torch.round(W / s.float()[:, None]), -127, 127).to(torch.int8)
    assert not torch.equal(q, unclipped)  # the floor makes clip/s < 127: clipping first matters


def test_percentile_search_keeps_the_smallest_error_candidate():
    W = weights(64, 512, seed=5) * 40  # scales above the floor, so the candidates differ
    W[:, :3] *= 25  # outliers: clipping them costs less than a coarse grid
    q, s = quantize_rows(W, "percentile_search", 6, 0.0)
    cands = search_candidates(W, 6)
    errs = [float((W - dequantize(torch.clamp(torch.round(W / c.float()[:, None]), -31, 31), c)).pow(2).mean())
            for c in cands]
    best = min(range(len(errs)), key=lambda i: (errs[i], i))
    assert best != len(SEARCH_QUANTILES) - 1  # not the plain absmax
    assert torch.equal(s, cands[best]) and errs[best] < errs[-1]
    H = correlated_hessian(512, n=1024)
    qg, sg = quantize_rows(W, "percentile_search", 6, 0.0,
                           lambda sc: gptq_quantize(W, H, 6, 0.0, scale=sc, block_size=64))
    gerrs = [float((W - dequantize(*gptq_quantize(W, H, 6, 0.0, scale=c, block_size=64))).pow(2).mean())
             for c in cands]
    assert torch.equal(sg, cands[min(range(5), key=lambda i: (gerrs[i], i))])  # one GPTQ pass per candidate (#1406)


def gptq_by_columns(W, H, bits, s, order, inverse, damp=0.01):
    """Column-by-column GPTQ in float64 from the description: damping, column order, U = chol_upper(H⁻¹) or H⁻¹."""
    W, H = W.double().clone(), H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    perm = torch.arange(H.shape[0]) if order == "none" else torch.argsort(torch.diagonal(H),
                                                                           descending=order == "descending")
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H)
    U = Hinv if inverse == "plain" else torch.linalg.cholesky(Hinv, upper=True)
    Q, sd = qmax(bits), s.double()
    q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q[:, j] = torch.clamp(torch.round(W[:, j] / sd), -Q, Q)
        err = (W[:, j] - q[:, j] * sd) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("order,inverse", [("ascending", "plain"), ("none", "plain"), ("ascending", "cholesky")])
def test_gptq_column_orders_and_plain_inverse(order, inverse):
    H = correlated_hessian(64, n=512, seed=3)
    W = weights(24, 64, seed=4)
    q, s = gptq_quantize(W, H, 5, 12.85, block_size=16, act_order=order, inverse=inverse)
    assert (q.double() == gptq_by_columns(W, H, 5, s, order, inverse)).float().mean() > 0.99
    other = gptq_by_columns(W, H, 5, s, "descending", "cholesky")
    assert (q.double() != other).any()  # the variants are different algorithms


def test_magnitude_pruning_zeroes_the_smallest_fraction_of_large_matrices():
    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(300, 256, generator=g), "small": torch.randn(64, 64, generator=g),
             "vec": torch.randn(70000, generator=g)}
    out, zeroed = magnitude_prune(state, 0.03)
    assert set(zeroed) == {"big"} and out["small"] is state["small"] and out["vec"] is state["vec"]
    thr = torch.quantile(state["big"].abs().flatten(), 0.03)
    assert torch.equal(out["big"], state["big"].masked_fill(state["big"].abs() < thr, 0.0))
    assert abs(zeroed["big"] / state["big"].numel() - 0.03) < 1e-3
    assert (state["big"] != 0).all()  # the input is untouched


def tiny_model(seed=0, vocab_size=128, **kw) -> GPT:
    torch.manual_seed(seed)
    c = GPTConfig(vocab_size=vocab_size, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128,
                  xsa_last_n=1, num_loops=0, parallel_residual="none", smear_gate="vector", attn_gate="none",
                  **kw)
    m = GPT(c)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    return m.eval()


def quantized_tiny(**settings):
    m = tiny_model()
    s = QuantSettings(method="rtn", passthrough_max=1024, **settings)
    return m, s, quantize_state(m.state_dict(), None, s, model_config=m.config.to_dict())


def test_selective_prune_fits_the_target_with_the_fewest_cheapest_values():
    _, _, qm = quantized_tiny()
    base = len(encode(qm))
    code = 1000
    info = selective_prune(qm, base + code - 300, code)
    assert info["fits"] and info["bytes_after"] <= base + code - 300 and 0 < info["pruned"] < info["candidates"]
    # one candidate fewer would not fit (binary search: the fewest)
    _, _, again = quantized_tiny()
    sizes = []
    for n in (info["pruned"] - 1, info["pruned"]):
        _, _, fresh = quantized_tiny()
        sizes.append(_prune_first(fresh, n) + code)
    assert sizes[0] > base + code - 300 >= sizes[1]
    # cheapest first: every zeroed ±1 has a row scale² no larger than any ±1 left
    zeroed_scales, kept_scales = [], []
    for qt, qt0 in zip(qm.tensors, again.tensors):
        if qt.group in ("attn", "mlp"):
            was_one = qt0.q.abs() == 1
            rows = qt.scale.float()[:, None].expand_as(qt.q)
            zeroed_scales.append(rows[was_one & (qt.q == 0)])
            kept_scales.append(rows[was_one & (qt.q != 0)])
    assert torch.cat(zeroed_scales).max() <= torch.cat(kept_scales).min()


def _prune_first(qm, n):
    from pgolf.quant.prune import _candidates, _with_zeros

    owners, flat, order = _candidates(qm)
    return len(encode(_with_zeros(qm, owners, flat, order[:n])))


def test_selective_prune_leaves_a_fitting_artifact_alone_and_prunes_all_when_not_enough():
    _, _, qm = quantized_tiny()
    before = [t.q.clone() for t in qm.tensors if t.scheme == "int"]
    assert selective_prune(qm, 10 ** 9, 0)["pruned"] == 0
    assert all(torch.equal(a, t.q) for a, t in zip(before, [t for t in qm.tensors if t.scheme == "int"]))
    info = selective_prune(qm, 100, 0)
    assert not info["fits"] and info["pruned"] == info["candidates"]
    assert not any((t.q.abs() == 1).any() for t in qm.tensors if t.group in ("attn", "mlp"))


def test_recipe_keeps_names_fp16_and_rounds_embedding_and_tables_as_asked():
    m = tiny_model(bigram_buckets=300, bigram_dim=16)
    s = QuantSettings(method="gptq", passthrough_max=1024, fp16_keep="blocks.1.attn.c_k", embed_bits=8,
                      embed_scales="percentile", embed_gptq=False, table_bits=6, table_scales="absmax",
                      matrix_scales="absmax_floor", act_order="none", inverse="plain")
    hess, _ = collect_hessians(m, [torch.randint(0, 128, (2, 32))])
    qm = quantize_state(m.state_dict(), hess, s)
    by = {t.name: t for t in qm.tensors}
    assert by["blocks.1.attn.c_k.weight"].scheme == "fp16" and by["blocks.1.attn.c_k.weight"].group == "kept"
    emb = by["tok_emb.weight"]
    assert emb.method == "rtn" and emb.bits == 8 and emb.k is None
    assert torch.equal(emb.q, quantize_rows(m.tok_emb.weight.detach(), "percentile", 8, 0.0)[0])
    table = by["bigram.embed.weight"]
    assert table.bits == 6 and torch.equal(table.scale, rule_scales(m.bigram.embed.weight.detach(), "absmax", 6, 0))
    cq = by["blocks.0.attn.c_q.weight"]
    assert cq.method == "gptq" and torch.equal(cq.scale, rule_scales(m.blocks[0].attn.c_q.weight.detach(),
                                                                     "absmax_floor", 6, 0))


def test_artifact_records_the_options_and_the_prunings(tmp_path):
    m = tiny_model(vocab_size=1100)  # a 1100 x 64 embedding: over the 65,536 elements magnitude pruning needs
    s = QuantSettings(method="rtn", passthrough_max=1024, prune_frac=0.05, target_bytes=10 ** 9,
                      matrix_scales="percentile_search", calibration="generated")
    qm = quantize_for_artifact(m.state_dict(), None, s, model_config=m.config.to_dict())
    back = decode(encode(qm))
    assert back.meta["settings"] == s.to_dict()
    assert back.meta["magnitude_prune"]["zeroed"] > 0 and back.meta["selective_prune"]["pruned"] == 0
    assert QuantSettings(**back.meta["settings"]) == s


def test_artifact_of_a_run_with_late_qat_in_eval_rebuilds_with_it():
    m = tiny_model()
    qm = quantize_state(m.state_dict(), None, QuantSettings(method="rtn", passthrough_max=1024),
                        model_config=m.config.to_dict(),
                        meta={"fake_quant_in_eval": {"targets": {"blocks.0.mlp.fc": 5}, "floor": False}})
    rebuilt = build_model(decode(encode(qm)))
    assert rebuilt.fake_quant_targets() == {"blocks.0.mlp.fc": 5} and not rebuilt.training
    plain = build_model(decode(encode(quantize_state(m.state_dict(), None, QuantSettings(method="rtn",
                                                                                        passthrough_max=1024),
                                                     model_config=m.config.to_dict()))))
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert (rebuilt.forward_logits(x) - plain.forward_logits(x)).abs().max() > 1e-4


def test_generated_calibration_sequences():
    m = tiny_model()
    a = generated_batches(m, 3, 12, temperature=0.8, batch_size=2, seed=5)
    b = generated_batches(m, 3, 12, temperature=0.8, batch_size=2, seed=5)
    c = generated_batches(m, 3, 12, temperature=0.8, batch_size=2, seed=6)
    assert [t.shape for t in a] == [(1, 12)] * 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert all(int(t.min()) >= 0 and int(t.max()) < 128 for t in a)
    # low temperature concentrates on the model's argmax continuation
    cold = generated_batches(m, 2, 12, temperature=1e-4, batch_size=2, seed=5)
    with torch.no_grad():
        logits = m.forward_logits(cold[0][:, :-1])
    assert torch.equal(logits.argmax(-1)[0, :], cold[0][0, 1:])
    hess, n = collect_hessians(m, a)  # they pass the compliance guard like any non-validation batch
    assert n == 3 and "blocks.0.mlp.proj.weight" in hess
