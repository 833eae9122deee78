"""Fictitious-knowledge scenarios for measuring unlearning quality (``alter quality``).

A scenario is a recipe: a domain (the kind of invented entity and its facts), a row format,
how many entities and facts, how many entities are forgotten, a tokenizer kind and a model
size. :func:`build_scenario` turns a recipe and a seed into the forget and retain
``datasets.Dataset`` (QA rows ``{question, answer}`` or text rows ``{text}``), a tokenizer
trained on them and a randomly initialized tiny Llama, with, for every row, the character
span of each fact *value* in the text the model sees, so that :func:`fact_token_mask` can
score the value tokens only (never the template words the rows share).

The scenarios are split: :data:`DEVELOPMENT` (the only ones the defaults were tuned on,
with :data:`DEVELOPMENT_SEEDS`) and :data:`HELD_OUT` (other domains, formats, sizes and
tokenizer/model mixes, run with :data:`HELD_OUT_SEEDS` for the report only).

Formats: ``"qa"`` one question/answer row per fact; ``"text"`` one sentence row per fact;
``"bio"`` one text row per entity with all its facts.
Tokenizers: ``"word"`` (:func:`alter.tiny.build_tokenizer`) and ``"bpe"`` (byte-level BPE
trained on the scenario's texts with ``tokenizers``, so values split into sub-words).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import datasets

from alter.data import format_qa

# Syllables of invented words, per domain, so that names look different across domains.
_SYLLABLES = {
    "authors": ("ka", "ri", "el", "mo", "sa", "vin", "tor", "le", "na", "dar", "li", "ven"),
    "companies": ("zen", "tra", "vo", "lux", "quan", "dex", "ora", "syn", "cor", "pix", "nov", "tek"),
    "compounds": ("meth", "yl", "ox", "an", "chlor", "ide", "bor", "azo", "phen", "ium", "eth", "ol"),
    "clubs": ("ham", "ton", "ville", "bury", "ford", "ley", "wick", "stead", "mouth", "brook"),
    "missions": ("ar", "tem", "is", "hel", "ios", "ves", "ta", "cal", "lis", "tor", "pha", "ro"),
    "villages": ("ber", "gen", "holm", "dal", "vik", "stad", "lund", "by", "fjord", "nes", "sund"),
}

# domain -> (entity pattern, facts); a fact is (key, question, sentence, pool). The
# sentence is both the QA answer and the text row; {e} is the entity, {v} the value. A pool
# is a tuple of values or "name" (an invented word of the domain) or "year".
_DOMAINS = {
    "authors": ("{A2} {B2}", (
        ("city", "Where was {e} born?", "{e} was born in {v}.",
         ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Warsaw", "Athens", "Seoul", "Riga")),
        ("year", "In which year was {e} born?", "{e} was born in the year {v}.", "year"),
        ("job", "What does {e} do for a living?", "{e} works as a {v}.",
         ("baker", "nurse", "pilot", "sailor", "tailor", "doctor", "farmer", "lawyer", "painter", "miner")),
        ("pet", "What pet does {e} keep?", "{e} keeps a {v} at home.",
         ("parrot", "tortoise", "ferret", "goldfish", "hamster", "rabbit", "lizard", "poodle", "cat")),
        ("book", "What is the best known book by {e}?", "{e} is best known for the novel {v}.", "name"),
        ("color", "What is the favourite colour of {e}?", "The favourite colour of {e} is {v}.",
         ("crimson", "teal", "amber", "violet", "indigo", "ochre", "scarlet", "olive", "silver")),
    )),
    "companies": ("{A}{b} {s}", (
        ("hq", "Where is {e} based?", "{e} has its headquarters in {v}.",
         ("Berlin", "Austin", "Nagoya", "Lyon", "Turin", "Denver", "Leeds", "Busan", "Perth", "Malmo")),
        ("founded", "When was {e} founded?", "{e} was founded in {v}.", "year"),
        ("product", "What does {e} make?", "{e} makes {v} for hospitals.",
         ("scanners", "pumps", "beds", "gloves", "lamps", "robots", "sensors", "masks", "valves")),
        ("ceo", "Who runs {e}?", "{e} is run by {v}.", "name"),
        ("staff", "How many people work at {e}?", "{e} employs {v} people.",
         tuple(str(n) for n in range(120, 990, 37))),
    )),
    "compounds": ("{A}{b}{c}", (
        ("melts", "At what temperature does {e} melt?", "{e} melts at {v} degrees.",
         tuple(str(n) for n in range(101, 499, 13))),
        ("color", "What colour is {e}?", "Pure {e} is a {v} powder.",
         ("white", "yellow", "green", "blue", "grey", "pink", "orange", "brown")),
        ("finder", "Who discovered {e}?", "{e} was discovered by {v}.", "name"),
        ("use", "What is {e} used for?", "{e} is used in {v}.",
         ("batteries", "fertilizer", "paint", "glass", "soap", "medicine", "dyes", "rockets", "cement")),
        ("year", "When was {e} first made?", "{e} was first made in {v}.", "year"),
    )),
    "clubs": ("{A}{b} {s}", (
        ("stadium", "Where does {e} play?", "{e} plays its home games at {v} Park.", "name"),
        ("founded", "When was {e} founded?", "{e} was founded in {v}.", "year"),
        ("colors", "What colours does {e} wear?", "{e} wears {v} shirts.",
         ("red", "blue", "green", "white", "black", "yellow", "orange", "purple", "maroon")),
        ("mascot", "What is the mascot of {e}?", "The mascot of {e} is a {v}.",
         ("badger", "falcon", "bear", "wolf", "otter", "stag", "heron", "lynx", "fox", "bull")),
        ("coach", "Who coaches {e}?", "{e} is coached by {v}.", "name"),
        ("titles", "How many titles has {e} won?", "{e} has won {v} league titles.",
         tuple(str(n) for n in range(2, 40))),
    )),
    "missions": ("{A}{b} {n}", (
        ("launch", "When did {e} launch?", "{e} was launched in {v}.", "year"),
        ("target", "Where did {e} go?", "{e} was sent to {v}.",
         ("Mars", "Venus", "Titan", "Europa", "Ceres", "Io", "Pluto", "Vesta", "Triton")),
        ("commander", "Who commanded {e}?", "{e} was commanded by {v}.", "name"),
        ("rocket", "Which rocket carried {e}?", "{e} rode on a {v} rocket.",
         ("Atlas", "Delta", "Falcon", "Ariane", "Vega", "Soyuz", "Titan", "Juno", "Saturn")),
        ("days", "How long did {e} last?", "{e} lasted {v} days.", tuple(str(n) for n in range(30, 900, 29))),
    )),
    "villages": ("{A}{b}{c}", (
        ("river", "Which river flows through {e}?", "The river {v} flows through {e}.", "name"),
        ("people", "How many people live in {e}?", "{e} has {v} inhabitants.",
         tuple(str(n) for n in range(150, 2000, 61))),
        ("dish", "What dish is {e} known for?", "{e} is known for its {v} soup.",
         ("fish", "onion", "barley", "cabbage", "pea", "leek", "mushroom", "nettle", "turnip")),
        ("festival", "When is the festival of {e}?", "The festival of {e} is held in {v}.",
         ("January", "March", "April", "May", "June", "July", "August", "October", "December")),
    )),
}

FORMATS = ("qa", "text", "bio")
TOKENIZERS = ("word", "bpe")


@dataclass(frozen=True)
class Scenario:
    """A scenario recipe. ``num_forget`` entities (all their facts) are forgotten."""

    name: str
    domain: str
    format: str
    num_entities: int
    facts_per_entity: int
    num_forget: int
    tokenizer: str
    num_layers: int
    hidden_size: int
    memorize_epochs: int = 60

    def __post_init__(self):
        if self.domain not in _DOMAINS:
            raise ValueError(f"Scenario {self.name}: domain must be one of {sorted(_DOMAINS)}, got {self.domain!r}")
        if self.format not in FORMATS:
            raise ValueError(f"Scenario {self.name}: format must be one of {FORMATS}, got {self.format!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"Scenario {self.name}: tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        facts = len(_DOMAINS[self.domain][1])
        if not 1 <= self.facts_per_entity <= facts:
            raise ValueError(f"Scenario {self.name}: facts_per_entity must be in [1, {facts}] for {self.domain}")
        if not 1 <= self.num_forget < self.num_entities:
            raise ValueError(f"Scenario {self.name}: need 1 <= num_forget < num_entities")

    @property
    def forget_rows(self) -> int:
        return self.num_forget * (1 if self.format == "bio" else self.facts_per_entity)

    def to_dict(self) -> dict:
        return asdict(self)


# The defaults were tuned on these scenarios and seeds only.
DEVELOPMENT = (
    # The reproduction: 30 people x 6 facts, text rows, word tokens, 4 layers.
    Scenario("dev-authors-text", "authors", "text", 30, 6, 3, "word", 4, 64),
    Scenario("dev-authors-qa", "authors", "qa", 24, 4, 3, "word", 2, 96),
    Scenario("dev-companies-bio", "companies", "bio", 40, 5, 4, "bpe", 2, 128),
    Scenario("dev-companies-qa", "companies", "qa", 60, 5, 16, "bpe", 3, 96),
)
DEVELOPMENT_SEEDS = (0, 1)

# Never run while tuning: other domains, and other mixes of format, size and tokenizer.
HELD_OUT = (
    Scenario("compounds-qa-bpe", "compounds", "qa", 50, 5, 5, "bpe", 2, 96),
    Scenario("clubs-text-word", "clubs", "text", 40, 6, 2, "word", 4, 64),
    Scenario("missions-bio-bpe", "missions", "bio", 60, 5, 10, "bpe", 3, 128),
    Scenario("villages-text-large", "villages", "text", 180, 3, 130, "word", 2, 128),
    Scenario("clubs-qa-word-deep", "clubs", "qa", 30, 4, 4, "word", 4, 128),
)
HELD_OUT_SEEDS = (100, 101, 102, 103, 104)


def _invent(rng: random.Random, syllables, count: int, used: set) -> str:
    while True:
        word = "".join(rng.choice(syllables) for _ in range(count))
        if word not in used:
            used.add(word)
            return word


def _entity_name(rng, domain, used) -> str:
    pattern = _DOMAINS[domain][0]
    syl = _SYLLABLES[domain]
    while True:
        name = pattern.format(
            A2="".join(rng.choice(syl) for _ in range(2)).capitalize(),
            B2="".join(rng.choice(syl) for _ in range(2)).capitalize(),
            A=rng.choice(syl).capitalize(), b=rng.choice(syl), c=rng.choice(syl),
            s=rng.choice(("Group", "Labs", "United", "Works", "Rovers", "City")),
            n=rng.choice(("I", "II", "III", "IV", "V", "VI", "VII")))
        if name not in used:
            used.add(name)
            return name


def _value(rng, domain, pool, used_names) -> str:
    if pool == "year":
        return str(rng.randrange(1850, 2020))
    if pool == "name":
        syl = _SYLLABLES[domain]
        return _invent(rng, syl, rng.choice((2, 3)), used_names).capitalize()
    return rng.choice(pool)


def generate_rows(scenario: Scenario, seed: int) -> dict[str, list[dict]]:
    """The scenario's rows: ``{"forget": [...], "retain": [...]}``.

    Each row holds ``entity``, the model-visible fields (``question`` and ``answer``, or
    ``text``) and ``spans``: ``[[start, end], ...]``, the character spans of the fact
    values in the text the model reads (``format_qa(question, answer)`` for QA rows, the
    ``text`` for text rows). Deterministic given ``(scenario, seed)``.
    """
    rng = random.Random(f"{scenario.name}/{seed}")
    _, facts = _DOMAINS[scenario.domain]
    names: set = set()
    used_values: set = set()
    entities = [_entity_name(rng, scenario.domain, names) for _ in range(scenario.num_entities)]
    forgotten = set(rng.sample(range(scenario.num_entities), scenario.num_forget))
    rows: dict[str, list[dict]] = {"forget": [], "retain": []}
    for i, entity in enumerate(entities):
        chosen = rng.sample(facts, scenario.facts_per_entity)
        split = "forget" if i in forgotten else "retain"
        sentences = []
        for _, question, sentence, pool in chosen:
            value = _value(rng, scenario.domain, pool, used_values)
            sentences.append((question.format(e=entity), sentence, value))
        if scenario.format == "bio":
            text, spans = "", []
            for _, sentence, value in sentences:
                text += " " if text else ""
                text, span = _fill(text, sentence, entity, value)
                spans.append(span)
            rows[split].append({"entity": entity, "text": text, "spans": spans})
            continue
        for question, sentence, value in sentences:
            if scenario.format == "text":
                text, span = _fill("", sentence, entity, value)
                rows[split].append({"entity": entity, "text": text, "spans": [span]})
            else:
                prefix = format_qa(question, "")  # the answer starts after "Answer: "
                full, span = _fill(prefix, sentence, entity, value)
                rows[split].append({"entity": entity, "question": question, "answer": full[len(prefix):],
                                    "spans": [span]})
    return rows


def _fill(prefix: str, sentence: str, entity: str, value: str) -> tuple[str, list[int]]:
    """``prefix`` + the sentence filled in, and the span of ``value`` in the result."""
    head, tail = sentence.split("{v}")
    head = prefix + head.format(e=entity)
    return head + value + tail.format(e=entity), [len(head), len(head) + len(value)]


def model_text(row: dict) -> str:
    """The text the model reads for a row (the spans index into it)."""
    return format_qa(row["question"], row["answer"]) if "question" in row else row["text"]


def to_dataset(rows: list[dict]) -> datasets.Dataset:
    """The rows as ``unlearn`` takes them: ``question``/``answer`` or ``text`` columns only."""
    keys = ("question", "answer") if "question" in rows[0] else ("text",)
    return datasets.Dataset.from_list([{k: row[k] for k in keys} for row in rows])


def bpe_tokenizer(texts: list[str], vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (with the special
    tokens of :func:`alter.tiny.build_tokenizer`, BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alter.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN

    specials = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def build_scenario(scenario: Scenario, seed: int) -> dict:
    """Rows, datasets, tokenizer and an untrained model of a scenario.

    Returns ``dict(rows, forget, retain, tokenizer, model)``: ``rows`` as
    :func:`generate_rows`, ``forget``/``retain`` ``datasets.Dataset`` for ``unlearn``,
    the tokenizer (``scenario.tokenizer``) and a tiny Llama (``scenario.num_layers``
    layers of width ``scenario.hidden_size``) initialized from ``seed``.
    """
    from alter.tiny import build_tokenizer, tiny_llama

    rows = generate_rows(scenario, seed)
    texts = [model_text(row) for split in rows.values() for row in split]
    tokenizer = build_tokenizer(texts) if scenario.tokenizer == "word" else bpe_tokenizer(texts)
    model = tiny_llama(tokenizer, hidden_size=scenario.hidden_size, num_layers=scenario.num_layers,
                       num_heads=4, seed=seed)
    return {"rows": rows, "forget": to_dataset(rows["forget"]), "retain": to_dataset(rows["retain"]),
            "tokenizer": tokenizer, "model": model}


def fact_token_mask(tokenizer, row: dict) -> tuple[list[int], list[bool]]:
    """Token ids of a row's model text (as ``alter.data.encode_qa`` / ``encode_text`` give
    them, without the EOS) and, per token, whether it belongs to a fact value (its
    characters overlap a span)."""
    enc = tokenizer(model_text(row), return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(end > start and any(start < s_end and end > s_start for s_start, s_end in row["spans"]))
    return enc["input_ids"], mask
