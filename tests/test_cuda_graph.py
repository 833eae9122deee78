"""A patched model's decode step (entropy_source="lagged", triton kernels) captures in a
CUDA graph: nothing on its path reads a device value on the host (route, the lagged
entropy and the layers run unchecked), and replaying the graph gives the eager step's
logits. GPU only; on the CPU, tests/test_entropy.py and tests/test_ihl.py check that the
unchecked ops read no device value."""
import copy

import pytest
import torch

from alter.model import apply_alter
from conftest import require_backend
from test_model import alter_config, randomize_adapters, tiny_model, tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_patched_decode_step_captures_in_a_cuda_graph():
    require_backend("triton", "cuda")
    model = apply_alter(tiny_model(), alter_config(entropy_source="lagged", backend="triton")).cuda()
    randomize_adapters(model, 0.5)
    prompt = tokens(seq=6).cuda()
    with torch.no_grad():
        prefill = model(input_ids=prompt, use_cache=True)
    tracker = model.alter_tracker
    lagged, cache = tracker.lagged.entropy, prefill.past_key_values
    next_ids = prefill.logits[:, -1:].argmax(-1)

    def decode_step():
        step_cache = copy.deepcopy(cache)
        tracker.lagged.link(step_cache, lagged)  # each step gated by the prefill's entropy: a static input
        with torch.no_grad():
            return model(input_ids=next_ids, past_key_values=step_cache, use_cache=True).logits

    expected = decode_step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step()  # warm-up outside the capture (triton compiles, cuBLAS workspaces)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_step()
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)
