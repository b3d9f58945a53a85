"""The model traces under torch.compile(fullgraph=True) on dense and packed batches, in both loop modes."""

import pytest
import torch

from pgolf.model.gpt import GPT
from pgolf.model.presets import get_preset


@pytest.mark.parametrize("looping", [False, True])
def test_fullgraph_compile_matches_eager_dense_and_packed(looping):
    torch.manual_seed(0)
    cfg = get_preset("tiny").model.replace(model_dim=64, mlp_hidden=128, bigram_buckets=31, bigram_dim=16)
    model = GPT(cfg)
    with torch.no_grad():  # leave the zero init, so attention and MLP outputs matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.looping_active = looping
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    x = torch.randint(2, cfg.vocab_size, (2, 64))
    x[0, 20] = cfg.bos_id
    torch.testing.assert_close(compiled(x, x, reduction="none"), model(x, x, reduction="none"))
    flat = x.reshape(1, -1)
    cu = torch.tensor([0, 30, 64, 100, 128] + [128] * 59, dtype=torch.int32)
    eager = model(flat, flat, cu_seqlens=cu, max_seqlen=64, reduction="none")
    torch.testing.assert_close(compiled(flat, flat, cu_seqlens=cu, max_seqlen=64, reduction="none"), eager)
    # and packing really isolates: the packed row differs from treating it as one sequence
    assert not torch.allclose(eager, model(flat, flat, reduction="none"))
