

def test_compiled_fullgraph_model_trains_as_the_eager_one():
    """The per-call state is traceable: torch.compile captures a patched model's whole
    forward in one graph (aot_eager: graph capture and autograd, no C++ codegen)."""
    model = _patched(None)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = tokens()
    for run, patched in ((compiled, model), (reference, reference)):
        with forced_route(patched, [1, 2]):
            (run(input_ids=ids, labels=ids).loss + router_loss(patched)).backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)
