"""Plain next-token training, to build the models that unlearning starts from."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from alter.data import pad_id_of
from alter.methods.data import _batch, _epoch_order, _model_inputs, encode_dataset, model_context_length
from alter.methods.losses import token_nll
from alter.training.args import check_positive


def finetune(
    model,
    tokenizer,
    data,
    *,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
):
    """Full-parameter next-token training on ``data`` (QA or text ``datasets.Dataset``).

    Used to build TOFU-style target and retain models (memorize the facts) before
    unlearning. AdamW with linear decay; returns the model in eval mode.
    """
    check_positive("epochs", epochs)
    check_positive("batch_size", batch_size)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    examples = encode_dataset(tokenizer, data, "data", model_context_length(model) if max_length is None else max_length)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)
    model.train()
    bar = tqdm(total=total, desc="finetune", disable=not progress)
    for step in range(total):
        epoch, j = divmod(step, steps_per_epoch)
        ids = _epoch_order(len(examples), seed, epoch)[j * batch_size : (j + 1) * batch_size]
        batch = _batch(examples, ids, pad_id, device)
        loss = token_nll(model(**_model_inputs(batch)).logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3g}")
        if callback is not None:
            callback(step + 1, {"loss": value})
    bar.close()
    model.eval()
    return model
