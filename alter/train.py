"""Moved to :mod:`alter.training` (the loop in :mod:`alter.training.loop`); this module
re-exports the names ``alter.train`` had."""
from alter.methods import ADAPTER_METHODS, METHODS, build, method_class  # noqa: F401
from alter.methods.data import (  # noqa: F401
    _batch,
    _epoch_order,
    _examples_digest,
    _model_inputs,
    step_indices,
    base_model_pass,
    check_dataset,
    check_rows,
    encode_dataset,
    mark_routing_targets,
    model_context_length,
    split_subdomains,
)
from alter.methods.losses import (  # noqa: F401
    shift_labels,
    npo_loss,
    sequence_logprob,
    structural_exact,
    structural_surrogate,
    token_nll,
)
from alter.training.args import DEFAULT_EARLY_STOP_SHARE, STRUCTURAL_MODES, UnlearnArgs  # noqa: F401
from alter.training.args import check_positive as _check_positive  # noqa: F401
from alter.training.checkpoint import (  # noqa: F401
    CHECKPOINT_FILE,
    RUN_ARGS_FILE,
    _Checkpointer,
    _differences,
    _full_state,
    _rng_state,
    _save_result,
    _set_rng_state,
)
from alter.training.finetune import finetune  # noqa: F401
from alter.training.loop import (  # noqa: F401
    _autocast_factory,
    _checkpointing_on,
    _run,
    _set_checkpointing,
    unlearn,
)
from alter.training.report import FORGET_WARNING_RATIO, UnlearnReport, _report, routing_shares  # noqa: F401
from alter.training.schedule import (  # noqa: F401
    DEFAULT_EPOCHS,
    MAX_DEFAULT_STEPS,
    MAX_ROUTER_WARMUP,
    MIN_STEPS,
    LabelScores,
    bigram_surprisal,
    label_scores,
    run_length,
)
