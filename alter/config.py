"""``AlterConfig``: every knob of ALTER in one validated, JSON-serialisable dataclass.

The JSON layout follows PEFT: ``save_pretrained(directory)`` writes
``adapter_config.json`` (the config fields, plus an optional ``"base_model"`` record that
:func:`alter.adapters.save_adapter` uses to check the model an adapter is loaded into), and
``from_pretrained(directory)`` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

ADAPTER_CONFIG_NAME = "adapter_config.json"
# Key of adapter_config.json that describes the base model rather than the adapter.
BASE_MODEL_KEY = "base_model"

ENTROPY_SOURCES = ("prepass", "precomputed", "lagged")
FORGET_LOSSES = ("ihl", "nll_ascent")
TRAIN_ROUTES = ("router", "forced")
ROUTINGS = ("token", "sequence")
FORGET_TOKENS = ("unpredictable", "all")
# Route keys (alter.methods.data.route_keys): n-grams of up to SHORT_KEY_TOKENS tokens,
# longer ones (up to MAX_KEY_TOKENS) only for a row that has no short one.
SHORT_KEY_TOKENS = 3
MAX_KEY_TOKENS = 8
BACKEND_CHOICES = (None, "eager", "triton", "cpp")

DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",  # Phi-3 fused attention input projection
    "gate_up_proj",  # Phi-3 fused MLP input projection
    # GPT-NeoX (Pythia), Falcon, Bloom. A generic name such as ``dense`` is given with its
    # parent, so that it matches only these layers' projections.
    "query_key_value",
    "attention.dense",
    "self_attention.dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "self_attn.dense",  # Phi-1/2 (q/k/v_proj above)
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.out_proj",  # OPT attention; its fc1/fc2 hang off the layer itself: name them to adapt them
    "attn.out_proj",  # GPT-J
    "mlp.fc_in",
    "mlp.fc_out",
)
# The default of earlier versions: an adapter_config.json that holds it is still a default
# list (one match in all is enough), so adapters saved before still load.
EARLIER_DEFAULT_TARGET_MODULES = (
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"),
)


@dataclass
class AlterConfig:
    """Configuration of the AsymLoRA adapters, the entropy routing and the ALTER losses.

    Adapter shape:
      r: LoRA rank (>= 1). alpha: LoRA alpha (> 0); the adapter output is scaled by alpha / r.
      dropout: dropout probability on the adapter input, in [0, 1).
      num_experts: number of B matrices N (>= 2): expert 0 is the retention expert B_r,
        experts 1..N-1 are the forget experts B_f^d.
      target_modules: names of the ``nn.Linear`` modules to adapt; a module matches when its
        attribute name (or a dotted suffix of its path) equals an entry. The default names
        the projections of Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, GPT-NeoX, Falcon,
        Bloom, GPT-J and OPT (attention only). The output embedding (``lm_head``) is never
        adapted.

    Entropy and routing (DESIGN §1):
      tsallis_q: q of the Tsallis entropy S_q (q == 1 is Shannon). The default 1.2 is a
        q > 1, as the paper prescribes for the B experts: S_q with q > 1 is insensitive to
        the long tail of tiny probabilities of a real vocabulary (with q < 1 that tail
        dominates and nearly every token becomes "high entropy"), while its scale stays
        close to Shannon's, so the paper's threshold 1.2 keeps its meaning (S_1.2 = 1.2 for
        a uniform choice among ~4 tokens, Shannon's H = 1.2 among ~3.3). Note S_q < 1/(q-1)
        for q > 1: at q >= 1.84 the threshold 1.2 could never be reached.
      entropy_threshold: tokens with S_q > threshold are "high entropy".
      tau_high, tau_low: routing temperatures of high / low entropy tokens.
      k_high, k_low: experts kept per high / low entropy token, 1 <= k_low <= k_high <= N.
      a_learns_from_high_entropy_only: during training, lora_A gets gradient only from
        high-entropy tokens (DESIGN's a_grad_mask; the paper's setting, in :meth:`paper`).
        Off by default: the facts to forget are low-entropy tokens, so an A that learns
        from high-entropy tokens only barely moves them. Measured with ``alter quality``
        (forget / retain accuracy ratio, seed means): dev-companies-qa 0.45 / 0.93 (on)
        -> 0.28 / 0.91 (off); on the suite's former held-out scenarios (5 seeds)
        compounds 0.58 -> 0.45, clubs 0.12 -> 0.08, missions 0.33 -> 0.21, villages
        0.49 -> 0.41 at retain 0.94-0.98 either way.
      entropy_source: how the layers get each token's entropy: "prepass" (a no-grad base
        model forward before each forward), "precomputed" (given by the caller), "lagged"
        (generation: a decoded token is gated by the entropy of the distribution that
        produced it).
        Generation: the default "prepass" is exact and the cheapest exact option: the
        prompt's prepass runs the base decoder once with the entropy fused into the head,
        and each decoded token's runs that token alone on the base model's own KV cache
        (a second decode step per token and a second KV cache; CPU, benchmarks/RESULTS.md
        2026-12-07: decoding at ~0.5x the unpatched model's tokens/s, against ~0.75x
        with "lagged"). "lagged" runs no base forward after the prompt, but gates a
        token with another entropy (the adapted model's, one position earlier): on the
        bench's tiny Llama with random weights and adapters (median entropy 0.33), 15% of
        the decoded tokens fell on the other side of the threshold than under "prepass",
        and greedy outputs diverged within 1-2 tokens. "precomputed" costs nothing but
        needs the entropy up front (training, scoring). "prepass" and "lagged" follow
        beam search's reorders; a decode step on a KV cache other than the one the
        model's last cached forward returned (another such forward ran in between; an
        assistant model's decoding cropped it) raises rather than read the wrong state.

    Losses and optimisation (used by ``alter.training``; docs/training.md):
      high_entropy_weight: weight of high-entropy tokens in the inverted hinge loss (>= 0).
      beta, gamma, lam: weights of the forget (IHL), retain (NLL) and structural terms (>= 0).
      lr_A, lr_B: learning rates of the shared A and of the B experts and router (> 0).
      forget_loss: "ihl" (the inverted hinge loss, the paper's) or "nll_ascent" (an ablation).
      forget_tokens: which forget tokens the forget loss pushes down. "unpredictable":
        those a trigram model of the retain rows does not predict (a fact's value, an
        entity's name), while the retain NLL keeps the forget rows' other tokens (a BPE
        word's continuation, a template word, a value common among retained entities:
        what a model that never saw the forget rows predicts too; under the floor only
        up to it), and the early stop
        counts the unpredictable tokens only (``alter.methods.forget_tokens.split_predictable``;
        docs/training.md, "Forget tokens"); "all": every labelled forget token, the paper's.
      forget_floor: aim each forget token at the log-probability a backoff n-gram of the
        retain rows gives it (what a model that never saw the forget rows would): the
        forget loss pushes down the tokens above it, the kept ones (predictable) included,
        and the kept term holds up only the kept tokens below it; the early stop counts
        the unpredictable tokens still above theirs instead of those still predicted
        (docs/training.md, "A floor under the forget loss"). None (the default): on
        under ``forget_tokens="unpredictable"``, off under ``"all"`` (which has no
        floor: True with it is refused); False: the IHL with no floor and every kept
        token held (the default until 2026-12-07). From 2026-12-07 to 12-08 the floor
        stopped the unpredictable tokens only and held every kept token.
      template_tokens: keep the forget rows' template words whatever the trigram says: a
        labelled forget token that 9 of the 10 retain rows most like its row (all of them
        when fewer; by the prompt, a text row by the whole row) hold at the aligned place is kept, held up
        and (under the floor) never pushed (``alter.methods.forget_tokens.template_tokens``;
        docs/training.md, "Template words"). Off by default: the answers to forgotten
        questions stay sentences with a wrong value instead of babble (plausible answers
        0.36 -> 0.52 on development pairs no setting was chosen on), but forget quality
        falls there (0.60 -> 0.39) and on the outside check. Needs
        ``forget_tokens="unpredictable"``.
      train_routes: how the experts see tokens while they train. "router": the routers
        gate as at inference (the forget loss reaches the forget experts only, the retain
        loss every expert a retained token is routed to); "forced": every token of a
        forget sample of sub-domain d goes to forget expert d, every retained token to
        the retention expert (the paper's). See docs/training.md.

    The defaults are the settings measured to unlearn across the scenario suite of
    ``alter quality`` (benchmarks/QUALITY.md); :meth:`paper` gives the paper's settings.

    Routing (docs/routing.md):
      routing: "token" (the paper's: each layer's router gates each token from its input
        and entropy) or "sequence": a position goes to a forget expert once one of
        ``route_keys`` occurred at or before it, to the retention expert before (every
        layer alike; the routers are not used). ``unlearn`` finds the keys from its forget
        and retain rows and its tokenizer (``alter.methods.data.route_keys``: each key also
        in the other spacing of its text, so that a name opening a sentence and one inside
        it both fire): isolation by construction on those rows (docs/routing.md, "(e) The
        sequence route", "(g)"). None (the default):
        "sequence" when ``unlearn`` trains forget experts (params asym_lora), "token"
        elsewhere (adapters applied on their own have no keys; lora has no forget expert).
      route_keys: the keys of "sequence" routing, a list of {"tokens": 1 to 8 token ids,
        "expert": a forget expert in [1, num_experts)}; saved with the adapter.

    backend: backend of every op (None = the best available per op and device, see
      ``alter_kernels._dispatch``). A named backend is required of every op: "cpp" makes
      route and asym_lora (which have no C++ version) raise BackendUnavailable.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_experts: int = 4
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    tsallis_q: float = 1.2
    entropy_threshold: float = 1.2
    tau_high: float = 0.8
    tau_low: float = 0.01
    k_high: int = 3
    k_low: int = 1
    high_entropy_weight: float = 0.0
    beta: float = 1.0
    gamma: float = 1.0
    lam: float = 0.01
    lr_A: float = 1e-3
    lr_B: float = 3e-3
    entropy_source: str = "prepass"
    backend: str | None = None
    a_learns_from_high_entropy_only: bool = False
    forget_loss: str = "ihl"
    forget_tokens: str = "unpredictable"
    forget_floor: bool | None = None
    template_tokens: bool = False
    train_routes: str = "router"
    routing: str | None = None
    route_keys: list[dict] = field(default_factory=list)

    @classmethod
    def paper(cls, **overrides) -> "AlterConfig":
        """The paper's settings (ALTER, §5): r 8, alpha 16, 4 experts, Tsallis q 1.2 and
        threshold 1.2, tau 0.8 / 0.01, top-3 / top-1 experts, beta = gamma = 1,
        lam 0.01, lr_A 1e-5, lr_B 1e-3, A learning from high-entropy tokens only,
        experts trained under forced routes, every forget token pushed down.
        ``overrides`` replace fields. These learning rates were set for 7B models; on the
        small models of ``alter quality`` they forget nothing within the default run."""
        values = dict(r=8, alpha=16.0, num_experts=4, tsallis_q=1.2, entropy_threshold=1.2, tau_high=0.8,
                      tau_low=0.01, k_high=3, k_low=1, beta=1.0, gamma=1.0, lam=0.01, lr_A=1e-5, lr_B=1e-3,
                      a_learns_from_high_entropy_only=True, train_routes="forced", forget_tokens="all",
                      routing="token")
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"AlterConfig: target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("AlterConfig: target_modules must name at least one module")
        for name in ("r", "num_experts", "k_high", "k_low"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"AlterConfig: {name} must be an int, got {value!r}")
        if self.r < 1:
            raise ValueError(f"AlterConfig: r (the LoRA rank) must be >= 1, got {self.r}")
        if self.num_experts < 2:
            raise ValueError(
                f"AlterConfig: num_experts must be >= 2 (expert 0 retains, experts 1.. forget), got {self.num_experts}"
            )
        if not 1 <= self.k_low <= self.k_high <= self.num_experts:
            raise ValueError(
                "AlterConfig: need 1 <= k_low <= k_high <= num_experts, got "
                f"k_low={self.k_low}, k_high={self.k_high}, num_experts={self.num_experts}"
            )
        for name in ("alpha", "tsallis_q", "entropy_threshold", "tau_high", "tau_low", "lr_A", "lr_B"):
            _check_real(name, getattr(self, name), positive=True)
        for name in ("high_entropy_weight", "beta", "gamma", "lam"):
            _check_real(name, getattr(self, name), positive=False)
        _check_real("dropout", self.dropout, positive=False)
        if not self.dropout < 1:
            raise ValueError(f"AlterConfig: dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("entropy_source", ENTROPY_SOURCES), ("forget_loss", FORGET_LOSSES),
                              ("forget_tokens", FORGET_TOKENS),
                              ("train_routes", TRAIN_ROUTES), ("backend", BACKEND_CHOICES), ("routing", ROUTINGS + (None,))):
            check_choice(name, getattr(self, name), allowed, "AlterConfig")
        self.route_keys = _checked_route_keys(self.route_keys, self.num_experts)
        if self.forget_floor is not None and not isinstance(self.forget_floor, bool):
            raise ValueError(f"AlterConfig: forget_floor must be a bool or None, got {self.forget_floor!r}")
        if self.forget_floor and self.forget_tokens != "unpredictable":
            raise ValueError("AlterConfig: forget_floor needs forget_tokens='unpredictable' (the floor is the retain "
                             f"n-gram's log-probability of each split forget token), got {self.forget_tokens!r}")
        if not isinstance(self.template_tokens, bool):
            raise ValueError(f"AlterConfig: template_tokens must be a bool, got {self.template_tokens!r}")
        if self.template_tokens and self.forget_tokens != "unpredictable":
            raise ValueError("AlterConfig: template_tokens needs forget_tokens='unpredictable' (template words are "
                             f"kept out of the split's unpredictable tokens), got {self.forget_tokens!r}")
        if not isinstance(self.a_learns_from_high_entropy_only, bool):
            raise ValueError(
                f"AlterConfig: a_learns_from_high_entropy_only must be a bool, got {self.a_learns_from_high_entropy_only!r}"
            )

    @property
    def floors_forget_tokens(self) -> bool:
        """Whether every forget token is aimed at the retain n-gram's floor (``forget_floor``
        resolved: None is on under ``forget_tokens="unpredictable"``)."""
        return self.forget_tokens == "unpredictable" if self.forget_floor is None else self.forget_floor

    @property
    def scaling(self) -> float:
        """The adapter output scale alpha / r."""
        return self.alpha / self.r

    # --- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-compatible dict (a copy)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AlterConfig":
        """Build a config from :meth:`to_dict` output; missing keys take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"AlterConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "AlterConfig":
        values = read_json(path)
        values.pop(BASE_MODEL_KEY, None)
        return cls.from_dict(values)

    def save_pretrained(self, directory: str | os.PathLike, base_model: dict[str, Any] | None = None) -> None:
        """Write ``directory/adapter_config.json`` (creating the directory).

        ``base_model`` (e.g. ``{"model_type": "llama", "hidden_size": 4096}``) is stored
        under the key ``"base_model"`` for checking at load time.
        """
        os.makedirs(directory, exist_ok=True)
        values = self.to_dict()
        if base_model is not None:
            values[BASE_MODEL_KEY] = dict(base_model)
        with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "AlterConfig":
        """Read ``directory/adapter_config.json`` (the ``"base_model"`` record is skipped)."""
        return cls.from_json_file(os.path.join(directory, ADAPTER_CONFIG_NAME))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError when the file holds something else."""
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: name the file
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def check_choice(name: str, value, allowed: Iterable, fn: str) -> None:
    """ValueError ``"{fn}: {name} must be one of {allowed}, got {value!r}"`` unless ``value`` is allowed."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {allowed}, got {value!r}")


def _checked_route_keys(keys, num_experts: int) -> list[dict]:
    """``keys`` as a list of {"tokens": [1 to MAX_KEY_TOKENS token ids >= 0],
    "expert": int in [1, num_experts)}; ValueError naming the first bad entry."""
    if not isinstance(keys, (list, tuple)):
        raise ValueError(f"AlterConfig: route_keys must be a list, got {type(keys).__name__}")
    checked, seen = [], {}
    for i, key in enumerate(keys):
        ok = isinstance(key, dict) and set(key) == {"tokens", "expert"}
        tokens, expert = (key["tokens"], key["expert"]) if ok else (None, None)
        ok = ok and isinstance(tokens, (list, tuple)) and 1 <= len(tokens) <= MAX_KEY_TOKENS and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
        ok = ok and isinstance(expert, int) and not isinstance(expert, bool) and 1 <= expert < num_experts
        if not ok:
            raise ValueError(f"AlterConfig: route_keys[{i}] must be {{'tokens': 1 to {MAX_KEY_TOKENS} token ids, "
                             f"'expert': a forget expert in [1, {num_experts})}}, got {key!r}")
        checked.append({"tokens": [int(t) for t in tokens], "expert": int(expert)})
        first = seen.setdefault(tuple(checked[-1]["tokens"]), i)
        if first != i:  # which expert a repeated key would route to is undefined
            raise ValueError(f"AlterConfig: route_keys[{i}] repeats the tokens of route_keys[{first}]: {key!r}")
    return checked


def _check_real(name: str, value, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"AlterConfig: {name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"AlterConfig: {name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"AlterConfig: {name} must be >= 0, got {value}")
