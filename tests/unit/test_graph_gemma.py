"""graph.py's Gemma 3 path on a tiny random Gemma against the plain PyTorch reference (reference.py): q/k norms,
post-attention and post-FFN norms, GELU, scaled embeddings, rotate-half RoPE with a per-layer base, and
sliding-window attention, in one prefill and token by token through the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_graph_qwen import Session
from triton_models.gguf_loader import LlamaConfig
from triton_models.graph import DecoderWeights, QuantizedLinear, build_graph, concat_rows, quantize_blockwise

torch = pytest.importorskip("torch")

# Local layers see 4 tokens; every 2nd layer is global. Head size 32 != d_model / n_heads, as in Gemma.
CFG = LlamaConfig(
    n_layers=4,
    d_model=64,
    ffn_dim=96,
    n_heads=4,
    n_kv_heads=1,
    head_dim=32,
    rope_base=1_000_000.0,
    rms_eps=1e-6,
    vocab_size=160,
    context_length=64,
    tied_embeddings=True,
    arch="gemma3",
    embed_scale=8.0,
    attn_scale=32**-0.5,
    activation="gelu_tanh",
    sliding_window=4,
    global_every=2,
    rope_local_base=10_000.0,
)


def _random_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = CFG

    def lin(out: int, inp: int) -> np.ndarray:
        return rng.normal(0, 0.1, (out, inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0, 0.2, n)).astype(np.float32)

    w = {"token_embd.weight": rng.normal(0, 0.2, (c.vocab_size, c.d_model)).astype(np.float32)}
    w["output_norm.weight"] = norm(c.d_model)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": norm(c.d_model),
            p + "attn_q.weight": lin(c.n_heads * c.head_dim, c.d_model),
            p + "attn_k.weight": lin(c.n_kv_heads * c.head_dim, c.d_model),
            p + "attn_v.weight": lin(c.n_kv_heads * c.head_dim, c.d_model),
            p + "attn_q_norm.weight": norm(c.head_dim),
            p + "attn_k_norm.weight": norm(c.head_dim),
            p + "attn_output.weight": lin(c.d_model, c.n_heads * c.head_dim),
            p + "post_attention_norm.weight": norm(c.d_model),
            p + "ffn_norm.weight": norm(c.d_model),
            p + "ffn_gate.weight": lin(c.ffn_dim, c.d_model),
            p + "ffn_up.weight": lin(c.ffn_dim, c.d_model),
            p + "ffn_down.weight": lin(c.d_model, c.ffn_dim),
            p + "post_ffw_norm.weight": norm(c.d_model),
        }
    return w


def _decoder(w: dict[str, np.ndarray], table: np.ndarray | QuantizedLinear) -> DecoderWeights:
    n = CFG.n_layers
    blk = [f"blk.{i}." for i in range(n)]
    return DecoderWeights(
        config=CFG,
        embedding=table,
        head=table,
        final_norm=w["output_norm.weight"],
        attn_norm=[w[p + "attn_norm.weight"] for p in blk],
        qkv=[concat_rows([w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]]) for p in blk],
        o=[w[p + "attn_output.weight"] for p in blk],
        ffn_norm=[w[p + "ffn_norm.weight"] for p in blk],
        gate_up=[concat_rows([w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]]) for p in blk],
        down=[w[p + "ffn_down.weight"] for p in blk],
        rope_interleaved=False,
        q_norm=[w[p + "attn_q_norm.weight"] for p in blk],
        k_norm=[w[p + "attn_k_norm.weight"] for p in blk],
        post_attn_norm=[w[p + "post_attention_norm.weight"] for p in blk],
        post_ffn_norm=[w[p + "post_ffw_norm.weight"] for p in blk],
    )


@pytest.fixture(scope="module")
def setup() -> tuple[dict[str, np.ndarray], list[int], np.ndarray]:
    from triton_models.reference import ReferenceLlama

    rng = np.random.default_rng(3)
    w = _random_weights(rng)
    ids = [int(t) for t in rng.integers(0, CFG.vocab_size, 14)]  # well past the 4-token window
    expected = ReferenceLlama(CFG, w).eval()(torch.tensor([ids]))[0].numpy()
    return w, ids, expected


def test_gemma_prefill_matches_reference(setup: tuple[dict[str, np.ndarray], list[int], np.ndarray]) -> None:
    w, ids, expected = setup
    logits = Session(_decoder(w, w["token_embd.weight"])).run(ids)
    assert np.abs(logits - expected).max() < 1e-4


def test_gemma_decode_through_the_kv_cache_matches_reference(
    setup: tuple[dict[str, np.ndarray], list[int], np.ndarray],
) -> None:
    w, ids, expected = setup
    session = Session(_decoder(w, w["token_embd.weight"]))
    rows = [session.run(ids[:3])]
    rows += [session.run([t]) for t in ids[3:]]
    assert np.abs(np.concatenate(rows) - expected).max() < 1e-4


def test_sliding_window_is_what_the_reference_sees(setup: tuple[dict[str, np.ndarray], list[int], np.ndarray]) -> None:
    # A window one token off changes the logits well beyond the tolerance: the check above has teeth.
    from dataclasses import replace

    from triton_models.reference import ReferenceLlama

    w, ids, expected = setup
    wider = ReferenceLlama(replace(CFG, sliding_window=5), w).eval()(torch.tensor([ids]))[0].numpy()
    assert np.abs(wider - expected)[5:].max() > 1e-2


def test_one_8_bit_table_serves_lookup_and_head(setup: tuple[dict[str, np.ndarray], list[int], np.ndarray]) -> None:
    from triton_models.reference import ReferenceLlama

    w, ids, _ = setup
    table = quantize_blockwise(w["token_embd.weight"], 8)
    expected = ReferenceLlama(CFG, w | {"token_embd.weight": table.dequantize()}).eval()(torch.tensor([ids]))[0]
    weights = _decoder(w, table)
    model = build_graph(weights, CFG.context_length, accuracy_level=0)
    assert sum(1 for t in model.graph.initializer if t.name.endswith(".q") and t.dims[0] == CFG.vocab_size) == 1
    assert np.abs(Session(weights).run(ids) - expected.numpy()).max() < 1e-3
