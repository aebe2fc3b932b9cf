"""ZO estimates on tiny transformers models (OPT, Llama with tied embeddings, GPT-2, BERT
classification) equal autograd's directional derivative in float64."""

import pytest
import torch
from zo_testing import tiny_batch, tiny_hf_model

from zo_plugins import ZOOptimizer
from zo_plugins.core.optimizer import materialize_direction


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2", "bert"])
@pytest.mark.parametrize("mode", ["out-of-place", "in-place"])
def test_projected_grad_matches_autograd(kind, mode):
    model = tiny_hf_model(kind, dtype=torch.float64)
    model.train()
    batch = tiny_batch(kind)
    if kind == "opt":  # padding tokens in the batch: the pad row must be left alone
        batch["input_ids"][:, -3:] = model.config.pad_token_id
    # Llama's RMSNorm computes in float32 whatever the model dtype: its rounding noise
    # (~1e-7) divided by 2*eps dominates for small eps, so it gets eps=1e-4 and a looser check.
    eps, rel = (1e-4, 1e-4) if kind == "llama" else (1e-6, 1e-6)
    opt = ZOOptimizer(model, lr=0.0, eps=eps, perturbation=mode)

    def loss_fn():
        if kind == "bert":
            return model(**batch).loss
        # transformers upcasts causal-LM losses to float32; keep float64 end to end
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        )

    est = opt.estimate(loss_fn)
    opt.restore()
    loss = loss_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    expected = sum(
        (g * materialize_direction(opt, p, step=0).double()).sum() for g, p in zip(grads, params)
    ).item()
    assert est.projected_grads[0] == pytest.approx(expected, rel=rel, abs=1e-8)


def test_tied_embeddings_are_perturbed_once_and_identically():
    model = tiny_hf_model("llama", dtype=torch.float64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = ZOOptimizer(model, lr=0.0)
    names = [s.name for s in opt.specs()]
    assert sum("embed_tokens" in n or "lm_head" in n for n in names) == 1
