"""The load-time probe: does a model run on the engine exactly as on its own?

transformers owns the model math and the engine plugs in only its attention and applies the
LM head itself, so a model whose layers attend by their own code, keep a state beside the
keys and values, or transform their logits in a way the engine does not know would run, and
run wrong, with no error. ModelRunner calls probe() once, at start, on its own pool: a model
that fails is refused with the reason, before any request. Where the runner swapped the
model's ops for the engine's kernels and merged its projections (models/fused_ops.py), the
probe also holds the model's forward to its forward with transformers' own ops, and puts
those back if the two differ or the swapped forward raises (logged), so an op a kernel gets
wrong costs speed, never correctness.
"""

import logging

import torch

from w2s_engine.models.attention import ForwardBatch, current_batch
from w2s_engine.models.fp8_linear import dequantized
from w2s_engine.models.fused_ops import FusedOps, fuse_ops, fused_with, unfuse_ops

logger = logging.getLogger(__name__)


@torch.inference_mode()
def probe(runner):
    """Two tokens through the model's own forward, then the second again as a decode
    after the first: every layer must attend through the engine's function, and the
    decode's logits by the engine's LM head must be the model's own. A model that attends
    by its own code (Falcon), keeps a recurrent state (Falcon-H1's mamba heads) or
    transforms its logits in a way the engine does not know would otherwise run silently
    wrong. At start no sequence holds a block: the scratch block (and block 0 when a block
    holds one token) is free to write."""
    name = type(runner.model).__name__
    _refuse_by_structure(runner.model, name)
    full = getattr(runner.model.config.get_text_config(), "max_position_embeddings", None)
    if runner.shape.max_positions and full and runner.shape.max_positions < full:
        logger.warning("%s: context limited to %d of its %d positions: its longrope rotary "
                       "switches factors by the longest position of a forward, and the "
                       "engine's forwards pack many sequences (runner.context_limit)", name,
                       runner.shape.max_positions, full)
    bs, scratch = runner.block_size, runner.scratch_block
    blocks = [scratch] if bs >= 2 else [0, scratch]
    slots = [blocks[p // bs] * bs + p % bs for p in (0, 1)]
    embeddings = runner.model.get_input_embeddings().num_embeddings
    tokens = [embeddings // 2, embeddings // 3]     # not padding (a zero embedding)
    # ids, positions, slots (both tokens; then the second alone), cu, lengths, table
    words = runner.upload([*tokens, 0, 1, *slots, 0, 2, 2, *blocks])
    ints = words[:6].long()
    table = words[9:].view(1, len(blocks))
    both = ForwardBatch(input_ids=ints[:2], positions=ints[2:4], slot_mapping=ints[4:6],
                        cu_seqlens_q=words[6:8], seq_lens=words[8:9], block_tables=table,
                        max_query_len=2, kv_pool=runner.kv_pool, attended=[])
    second = ForwardBatch(input_ids=ints[1:2], positions=ints[3:4], slot_mapping=ints[5:6],
                          cu_seqlens_q=words[6:8] // 2, seq_lens=words[8:9],
                          block_tables=table, max_query_len=1, kv_pool=runner.kv_pool)

    def own_forward():
        # no w2s_batch keyword: a head's forward may not take it; the layers find the batch
        return runner.model(input_ids=both.input_ids[None], position_ids=both.positions[None],
                            use_cache=False)

    # (FP8 layers: weights dequantized, inputs as they are, so that the check sees the
    # architecture, not FP8's rounding of rows the two forwards compute a hair apart)
    try:
        with dequantized():
            current_batch.batch = both
            if runner.fused_ops:
                _check_fused_ops(runner, own_forward, name)
            own = own_forward()
            current_batch.batch = second
            hidden = runner.decoder(input_ids=second.input_ids[None],
                                    position_ids=second.positions[None], use_cache=False,
                                    w2s_batch=second).last_hidden_state[0]
    except NotImplementedError as e:
        raise ValueError(f"{name} cannot run on the engine: {e}") from None
    except Exception as e:      # its code needs what the paged attention does not give (MPT:
        # a mask tensor) or fails on the engine's batch
        raise ValueError(f"{name} cannot run on the engine: its forward fails on the engine's "
                         f"paged attention ({type(e).__name__}: {e})") from e
    finally:
        current_batch.batch = None
    _refuse_temperature_tuning(runner.model, name, runner.shape.max_positions)
    layers = runner.shape.num_layers
    if sorted(set(both.attended)) != list(range(layers)):
        raise ValueError(
            f"{name} does not attend through the engine's paged attention in every layer "
            f"(it did in {len(set(both.attended))} of {layers}): its attention code does "
            "not use transformers' AttentionInterface, or some layers are not attention "
            "(a recurrent hybrid); the engine cannot run this architecture")
    if torch.isnan(own.logits).any():
        if runner.dtype == torch.float32:   # no wider dtype to load it in: its weights
            bad = [n for n, p in runner.model.named_parameters() if not torch.isfinite(p).all()]
            raise ValueError(
                f"{name} gives NaN logits in float32 on its own forward"
                + (f": its weights hold NaN or inf ({', '.join(bad[:3])}"
                   + (", ..." if len(bad) > 3 else "") + ")" if bad else "")
                + "; check the checkpoint (or the adapter merged into it)")
        raise ValueError(f"{name} gives NaN logits in {runner.dtype} on its own forward (its "
                         "activations overflow): load it in bfloat16 or float32")
    if runner.lm_head is None or not torch.isfinite(own.logits).all():
        return
    width = runner.lm_head.weight.shape[-1] if hasattr(runner.lm_head, "weight") else None
    if width is not None and width != hidden.shape[-1]:
        # ELECTRA's generator: a dense layer and a norm between the decoder and its output
        # layer, which the engine's LM head (the output layer alone) would skip
        raise ValueError(
            f"{name}'s output layer takes vectors of {width}, but its decoder gives "
            f"{hidden.shape[-1]}: its head transforms the hidden state before the output "
            "layer, which the engine's LM head does not apply; the engine cannot run this "
            "architecture")
    expected = own.logits.reshape(-1, own.logits.shape[-1])[-1].float()
    error = _logits_error(runner.lm_head.logits(hidden)[-1], expected, runner.dtype)
    if error is not None:
        raise ValueError(
            f"{name}'s logits for a token decoded after a cached one differ from its own "
            f"forward's by up to {error:.3g}: it keeps a state besides its attention's "
            "keys and values (a recurrent hybrid), or transforms its logits in a way the "
            "engine's LM head does not know (it applies the output layer with its bias, "
            "final_logit_softcapping and the logit scales of Cohere and Granite); the "
            "engine cannot run this architecture")


# Model types whose activations overflow float16 (vLLM refuses them too): Gemma 2/3's
# logits become NaN a few tokens in, sampled as token 0 without an error.
FP16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text")


def _refuse_by_structure(model, name: str):
    """What the two-token probe cannot see, refused from the model's structure: a token mixer
    with a recurrent state beside attention (Falcon-H1's mamba heads: on two tokens its
    error can stay within the probe's tolerance, and it would run across the sequences packed
    in a forward), and a model in float16 whose activations overflow it."""
    kind = model.config.get_text_config().model_type
    if model.dtype == torch.float16 and kind in FP16_OVERFLOWS:
        raise ValueError(f"{name} ({kind}) overflows float16 (its logits turn NaN): load it "
                         "in bfloat16 or float32 (dtype='bfloat16')")
    for module in model.modules():
        kind = type(module).__name__
        if hasattr(module, "A_log") or "Mamba" in kind:
            raise ValueError(f"{name} cannot run on the engine: its {kind} mixes tokens "
                             "through a recurrent state beside attention, which the engine's "
                             "paged keys and values do not hold")



PACKED_ROWS = 16384   # rows of one forward a scale by row could reach (prefill chunks, decodes)


def _refuse_temperature_tuning(model, name: str, context: int | None):
    """Llama 4's attention temperature tuning (of its NoPE layers) scales queries from
    floor_scale positions on, by their row in the forward rather than their position:
    refused where a position or a packed forward's row reaches floor_scale. Checked after
    the probe's forward, which names the chunked attention of the released configs first."""
    for module in model.modules():
        floor = getattr(module, "floor_scale", None)
        if getattr(module, "attn_temperature_tuning", False) and floor is not None and \
                not getattr(module, "use_rope", True) and floor <= max(context or 0, PACKED_ROWS):
            raise ValueError(f"{name} cannot run on the engine: attn_temperature_tuning "
                             f"scales its queries from position {floor} on by their row in "
                             "the forward, which the engine packs with many sequences")


def _check_fused_ops(runner, own_forward, name):
    """The model's forward with its swapped ops against the same forward with transformers'
    own: within the rounding of the dtype (the tolerance of probe's logits check), or the
    ops go back to transformers' for good."""
    kernels = fused_with(runner.model)
    unfuse_ops(runner.model)
    plain = own_forward().logits.float()
    assert fuse_ops(runner.model, *kernels) == runner.fused_ops
    try:
        fused = own_forward().logits.float()
    except Exception as e:      # a kernel that cannot run here (a compiler's refusal, say)
        problem = f"fails ({type(e).__name__}: {e})"
    else:
        if not torch.isfinite(plain).all():
            return      # nothing to compare (as probe's logits check skips them too)
        error = _logits_error(fused, plain, runner.dtype)
        if error is None:
            return
        problem = f"differs from its own forward by up to {error:.3g}"
    unfuse_ops(runner.model)
    logger.warning("w2s engine: %s with the engine's fused kernels and merged projections %s; "
                   "running it with transformers' ops instead", name, problem)
    runner.fused_ops = FusedOps()


def _logits_error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest difference of two fp32 logit tensors when it is past the dtype's rounding,
    else None. fp32 agrees to rounding; half precision rounds each GEMM's output (0.4% in
    bf16), more so with another batch shape or a merged GEMM. A wrong op or scale is off by
    most of the logits."""
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    error = (got - want).abs().max().item()
    return None if error <= tolerance * want.abs().max().item() + 1e-4 else error
