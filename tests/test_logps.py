"""logps.py (the fused head FusedTokenLogps; chunked TokenLogps with its own backward; logits at
response positions only) against loss.sequence_logps, the plain definition, and plain autograd:
the same values and gradients."""
import pytest
import torch

import data
from machinery import batching
from machinery import logps
import loss
from machinery.logps import batch_logps


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
    monkeypatch.setattr(logps.FusedTokenLogps, "CHUNK_BYTES", 4 * 19 * 16)  # tiles of 19 positions x 16 entries:
    monkeypatch.setattr(logps.FusedTokenLogps, "MIN_BLOCK", 16)  # 2 x 4 tiles for the 24 positions x 61 entries
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


TILES = {  # (CHUNK_BYTES, MIN_BLOCK) -> tiles of 11 positions x 40 vocabulary entries
    "3 positions x all 40": (4 * 3 * 40, 4096),  # row tiles, a ragged last
    "all 11 positions x 7": (4 * 11 * 7, 7),  # vocabulary blocks, a ragged last (40 = 5 x 7 + 5)
    "3 positions x 7": (4 * 3 * 7, 7),  # both: the weight's gradient summed over row tiles
}


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_head_gives_autograds_values_and_gradients_tile_by_tile(bias, tiles, monkeypatch):
    monkeypatch.setattr(logps.FusedTokenLogps, "CHUNK_BYTES", TILES[tiles][0])
    monkeypatch.setattr(logps.FusedTokenLogps, "MIN_BLOCK", TILES[tiles][1])
    assert logps.FusedTokenLogps.tiles(11, 40) == {"3 positions x all 40": (3, 40), "all 11 positions x 7": (11, 7),
                                                   "3 positions x 7": (3, 7)}[tiles]
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


def test_pack_lays_sequences_end_to_end_and_restarts_their_positions():
    I = loss.IGNORE_INDEX
    sequences = [{"input_ids": [1, 2, 3, 4], "labels": [I, I, 3, 4]}, {"input_ids": [5, 6], "labels": [9, 6]},
                 {"input_ids": [7, 8, 9], "labels": [I, 8, 9]}]
    batch = batching.pack(sequences, pad_token_id=0)
    # Longest first, first fit, rows as wide as the longest sequence: [0] alone; [2] then [1]... no room: 3 + 2 > 4.
    assert batch["sequence"].tolist() == [[0, 0, 0, 0], [2, 2, 2, -1], [1, 1, -1, -1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [5, 6, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]  # padding: a segment of its own
    # A sequence's first label is never scored (nothing in it predicts its first token): IGNORE, as collate leaves it unread.
    assert batch["labels"].tolist() == [[I, I, 3, 4], [I, 8, 9, I], [I, 6, I, I]]
    wide = batching.pack(sequences, width=9)  # one row (FlashAttention's varlen layout)
    assert wide["sequence"].tolist() == [[0, 0, 0, 0, 2, 2, 2, 1, 1]]
    assert wide["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # Rows as wide as the longest sequence need 4 rows here (20 slots); one token wider, 3 rows do (18 slots).
    assert batching.first_fit([5, 3, 3, 3], 5) == [[0], [1], [2], [3]] and batching.fullest_width([5, 3, 3, 3]) == 6
    assert batching.first_fit([5, 3, 3, 3], 6) == [[0], [1, 2], [3]]


def packed_model(kind):
    """A tiny randomly initialised model of a type in PADDING_FREE_MODELS (or OPT, which is not)."""
    import transformers

    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)
    configs = {
        "llama": transformers.LlamaConfig(**kw), "mistral": transformers.MistralConfig(**kw, sliding_window=8),
        "mixtral": transformers.MixtralConfig(**kw, num_local_experts=4), "qwen2": transformers.Qwen2Config(**kw),
        "qwen2_moe": transformers.Qwen2MoeConfig(**kw, num_experts=4, moe_intermediate_size=16,
                                                 shared_expert_intermediate_size=16),
        "qwen3": transformers.Qwen3Config(**kw, head_dim=8),
        "qwen3_moe": transformers.Qwen3MoeConfig(**kw, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=16),
        "phi3": transformers.Phi3Config(**kw), "phi": transformers.PhiConfig(**kw),
        "gemma": transformers.GemmaConfig(**kw, head_dim=8),
        "gemma2": transformers.Gemma2Config(**kw, head_dim=8, sliding_window=8),
        "gemma3_text": transformers.Gemma3TextConfig(**kw, head_dim=8, sliding_window=8),
        "olmo2": transformers.Olmo2Config(**kw), "smollm3": transformers.SmolLM3Config(**kw),
        "gpt2": transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4),
        "gpt_neox": transformers.GPTNeoXConfig(**kw),
        "falcon": transformers.FalconConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "stablelm": transformers.StableLmConfig(**kw), "starcoder2": transformers.Starcoder2Config(**kw),
        "granite": transformers.GraniteConfig(**kw), "cohere": transformers.CohereConfig(**kw),
        "opt": transformers.OPTConfig(vocab_size=61, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0),
    }
    torch.manual_seed(0)
    attention = "eager" if kind == "gemma2" else "sdpa"  # transformers refuses SDPA for Gemma-2
    return transformers.AutoModelForCausalLM.from_config(configs[kind], attn_implementation=attention).eval()


@pytest.mark.parametrize("kind", sorted(logps.PADDING_FREE_MODELS) + ["opt"])
def test_packed_rows_give_the_padded_log_probs_and_gradients(kind):
    """Every model type that score() packs gives the padded batch's numbers; OPT, which takes its
    positions from the attention mask, does not, which is why it is not in PADDING_FREE_MODELS."""
    model = packed_model(kind)
    generator = torch.Generator().manual_seed(2)
    lengths = [(5, 7), (2, 2), (3, 11), (1, 1), (6, 9), (3, 3)]  # 12, 4, 14, 2, 15, 6 tokens: rows [15], [14], [12, 2], [6, 4]
    prompts = [torch.randint(1, 61, (p,), generator=generator).tolist() for p, _ in lengths]
    responses = [torch.randint(1, 61, (r,), generator=generator).tolist() for _, r in lengths]
    params = [p for p in model.parameters() if p.requires_grad]
    padded, tokens = logps.score(model, prompts, responses, logps.Scoring(64, 64))
    padded_grads = torch.autograd.grad(padded.sum(), params, allow_unused=True)
    packed, packed_tokens = logps.score(model, prompts, responses, logps.Scoring(64, 64, padding_free=True))
    packed_grads = torch.autograd.grad(packed.sum(), params, allow_unused=True)
    assert tokens.tolist() == packed_tokens.tolist() == [7, 2, 11, 1, 9, 3]
    if kind == "opt":
        assert not logps.packs(model)
        logps.PADDING_FREE_MODELS.add("opt")
        try:
            packed, _ = logps.score(model, prompts, responses, logps.Scoring(64, 64, padding_free=True))
        finally:
            logps.PADDING_FREE_MODELS.discard("opt")
        assert (packed - padded).abs().max() > 1e-3
        return
    assert logps.packs(model)
    assert torch.allclose(packed, padded, atol=2e-5)
    assert all(a is None and b is None or torch.allclose(a, b, atol=2e-5) for a, b in zip(packed_grads, padded_grads))


def test_flash_attention_gets_one_packed_row_which_gives_the_padded_log_probs(monkeypatch):
    """FlashAttention finds packed sequences in the position ids of a one-row batch only: score() packs
    one row for it. FlashAttention needs a GPU; here the row it would get goes through SDPA."""
    model = packed_model("llama")
    prompts, responses = [[5, 6, 7], [3, 4], [9]], [[8, 9, 10, 11], [12, 13], [14, 15, 16]]
    padded, _ = logps.score(model, prompts, responses, logps.Scoring(64, 64))
    batches = []
    with monkeypatch.context() as m:
        m.setattr(model.config, "_attn_implementation", "flash_attention_2")
        m.setattr(logps, "batch_logps", lambda model, batch, bf16=False: batches.append(batch) or torch.zeros(3))
        logps.score(model, prompts, responses, logps.Scoring(64, 64, padding_free=True))
    (batch,) = batches
    assert batch["input_ids"].shape == (1, 7 + 4 + 4) and (batch["sequence"] >= 0).all()  # no padding at all
    assert torch.allclose(logps.batch_logps(model, batch), padded, atol=2e-5)
