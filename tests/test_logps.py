"""logps.py (the fused head FusedTokenLogps; chunked TokenLogps with its own backward; logits at
response positions only) against loss.sequence_logps, the plain definition, and plain autograd:
the same values and gradients."""
import pytest
import torch

import data
import logps
import loss
from logps import batch_logps


def reference(logits, labels):
    """Plain autograd: float32 log_softmax over every position, gather, mask, sum."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != loss.IGNORE_INDEX
    logprobs = logits.float().log_softmax(-1).gather(2, labels.masked_fill(~mask, 0)[..., None])[..., 0]
    return (logprobs * mask).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_values_and_gradients_equal_autograd(dtype, monkeypatch):
    monkeypatch.setattr(logps.TokenLogps, "CHUNK_BYTES", 4 * 7 * 50)  # 7 rows per chunk: several chunks, a ragged last
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 50, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.randint(50, (3, 20), generator=generator)
    labels[:, :6] = loss.IGNORE_INDEX
    labels[1, 15:] = loss.IGNORE_INDEX  # padding
    weights = torch.randn(3, generator=generator)
    expected = reference(logits, labels)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), logits)
    got = logps.from_logits(logits, labels)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    definition = loss.sequence_logps(logits, labels)
    (grad_definition,) = torch.autograd.grad((definition * weights).sum(), logits)
    assert torch.allclose(definition, expected, atol=1e-5)
    assert torch.allclose(grad_definition.float(), grad_expected.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(grad_got.float(), grad_expected.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_overwrite_gives_the_same_gradient_and_refuses_a_second_backward():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=generator, requires_grad=True)
    head = torch.randn(30, 8, generator=generator)
    targets = torch.randint(30, (9,), generator=generator)
    mask = torch.tensor([[True] * 5 + [False], [False] * 2 + [True] * 4])
    grads = []
    for overwrite in (False, True):
        out = logps.response_logps(hidden @ head.T, targets, mask, overwrite=overwrite)
        (g,) = torch.autograd.grad(out.sum(), hidden, retain_graph=True)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
    with pytest.raises(RuntimeError, match="overwritten by the first backward"):
        out.sum().backward()


def tiny_model(kind, vocab):
    import transformers

    configs = {
        "mistral": transformers.MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2),
        "llama": transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2),
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4),
        "gemma2": transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            final_logit_softcapping=5.0),  # a model that changes logits after the head
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[kind], attn_implementation="eager").eval()  # no dropout


@pytest.mark.parametrize("kind", ["mistral", "llama", "gpt2", "gemma2"])
def test_batch_logps_equals_the_full_forward_and_its_gradient(kind, monkeypatch):
    monkeypatch.setattr(logps.FusedTokenLogps, "CHUNK_BYTES", 4 * 61 * 5)  # 5 positions per chunk: 5 chunks
    model = tiny_model(kind, vocab=61)
    generator = torch.Generator().manual_seed(2)
    sequences = [data.build_sequence(torch.randint(1, 61, (p,), generator=generator).tolist(),
                                     torch.randint(1, 61, (r,), generator=generator).tolist(), 64, 64)
                 for p, r in [(5, 7), (9, 2), (3, 11), (12, 4)]]
    batch = data.collate(sequences, pad_token_id=0)
    positions = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: positions.append(o.shape))
    full = loss.sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
    full_grads = torch.autograd.grad(full.sum(), list(model.parameters()))
    lean = batch_logps(model, batch)
    lean_grads = torch.autograd.grad(lean.sum(), list(model.parameters()))
    hook.remove()
    fused = kind in ("mistral", "llama")  # gpt2's type is not in FUSED_HEAD_MODELS; gemma2 soft-caps its logits
    assert logps.fused_head(model) == fused
    # The head ran on the 24 response positions only; fused, it returned log p(target) for each, not 61 logits.
    assert positions == [(4, 16, 61), (1, 7 + 2 + 11 + 4, 1 if fused else 61)]
    assert torch.allclose(lean, full, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lean_grads, full_grads))


@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_head_gives_autograds_values_and_gradients_chunk_by_chunk(bias, monkeypatch):
    monkeypatch.setattr(logps.FusedTokenLogps, "CHUNK_BYTES", 4 * 40 * 3)  # 3 rows per chunk, a ragged last
    generator = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 40, bias=bias).double()  # float64: the comparison is exact to 1e-10
    hidden = torch.randn(11, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(40, (11,), generator=generator)
    weights = torch.randn(11, generator=generator, dtype=torch.float64)
    expected = head(hidden).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    got = logps.FusedTokenLogps.apply(hidden, head.weight, head.bias, targets, head)
    got_grads = torch.autograd.grad((got * weights.float()).sum(), params)
    assert got.dtype == torch.float32  # log p(target) in float32, whatever the head's dtype
    assert torch.allclose(got.double(), expected, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-6)


def test_the_fused_head_under_bf16_autocast_stays_near_float32_and_can_be_turned_off(monkeypatch):
    model = tiny_model("llama", vocab=61)
    sequences = [data.build_sequence([5, 6, 7], [8, 9, 10, 11], 64, 64), data.build_sequence([3, 4], [12, 13], 64, 64)]
    batch = data.collate(sequences)
    exact = batch_logps(model, batch)
    assert torch.allclose(batch_logps(model, batch, bf16=True), exact, atol=0.1)  # bf16 matmuls, float32 softmax
    monkeypatch.setenv("SPIN_FUSED_HEAD", "0")
    assert not logps.fused_head(model)
    assert torch.allclose(batch_logps(model, batch), exact, atol=1e-5)
