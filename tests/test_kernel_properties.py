"""Property tests of the attention kernels (hypothesis): random context and chunk lengths
against the references. Apart from tests/test_kernels.py so that a machine without hypothesis
(the lent GPU's) still collects every kernel test there."""

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_kernels import paged_setup  # noqa: E402
from w2s_engine.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention_ref, paged_decode_attention_triton, paged_extend_attention_grouped_triton,
    paged_extend_attention_ref, paged_extend_attention_triton)


@settings(max_examples=12, deadline=None)
@given(data=st.data(), bs=st.sampled_from([4, 8, 16]), window=st.sampled_from([None, 3, 40]),
       softcap=st.sampled_from([None, 25.0]))
def test_attention_kernels_equal_the_reference_wherever_their_unmasked_steps_end(
        data, bs, window, softcap):
    """Random context and chunk lengths around the interpreter's key step (32) and query tile
    (64): the steps every query sees run unmasked, the rest masked, and where one ends and
    the other begins (a step boundary, a block boundary, a tile's first query) the outputs
    are the reference's. Decode, the per-head extend and the grouped (scoring) extend."""
    n = data.draw(st.integers(1, 4), label="sequences")
    qlens = data.draw(st.lists(st.integers(1, 70), min_size=n, max_size=n), label="chunks")
    lens = [q + data.draw(st.integers(0, 100), label="context") for q in qlens]
    k, v, bt, sl = paged_setup(torch.float32, 8, 2, bs, lens, seed=len(lens))
    cu = torch.tensor([0, *np.cumsum(qlens)], dtype=torch.int32)
    q = torch.randn(sum(qlens), 8, 32)
    out = paged_extend_attention_triton(q, k, v, bt, cu, sl, 0.2, window, softcap,
                                        grouped=False)
    ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    short = [min(x, 8) for x in qlens]   # a scoring chunk of each: the grouped kernel
    cu = torch.tensor([0, *np.cumsum(short)], dtype=torch.int32)
    q = torch.randn(sum(short), 8, 32)
    splits = data.draw(st.sampled_from([1, 2]), label="splits")
    out = paged_extend_attention_grouped_triton(q, k, v, bt, cu, sl, 0.2, window, softcap,
                                                max_query_len=max(short), num_splits=splits)
    ref = paged_extend_attention_ref(q, k, v, bt, cu, sl, 0.2, window, softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    q = torch.randn(n, 8, 32)
    out, lse = paged_decode_attention_triton(q, k, v, bt, sl, 0.2, window, softcap,
                                             num_splits=splits)
    ref, ref_lse = paged_decode_attention_ref(q, k, v, bt, sl, 0.2, window, softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
