"""Fact scenarios for the outside check, written without the library's generators.

Four scenarios (ships, scientists, monasteries, observatories) of invented entities, each
with a few attributes whose values come from pools shared by all entities: a forgotten
value is still a plausible answer for other entities, so an oracle that never saw the
forget entities guesses from the pool instead of knowing nothing. Every fact has two
phrasings: a question/answer pair (what ``alter.unlearn`` is given) and a statement
(never given to ``unlearn``; it shows whether the forgetting generalises beyond the
phrasing it was trained on).

This module deliberately shares no code with ``alter.data.scenarios``: the point of the
check is that scenarios, metrics and thresholds come from someone other than the
library's authors, so nothing here may have been tuned along with the library.
"""
import random


# Syllables for invented names: no fact can be known from anywhere but the training rows.
SYL = ["ka", "vel", "mor", "tri", "san", "dol", "ber", "qu", "zan", "lo", "ith", "ra", "nem", "or", "fal",
       "gri", "shu", "ten", "ax", "pel", "dro", "mi", "yor", "cas", "ul", "bren", "ova", "thi", "gar", "eph"]


def invent_names(rng, n, lo=2, hi=3, taken=()):
    """n distinct capitalised names of lo..hi syllables, none in taken."""
    out, seen = [], set(taken)
    while len(out) < n:
        w = "".join(rng.choice(SYL) for _ in range(rng.randint(lo, hi))).capitalize()
        if w not in seen and len(w) >= 5:
            seen.add(w)
            out.append(w)
    return out


def person_names(rng, n, taken=()):
    """n distinct "First Last" names; few first/last names so they recur across people."""
    firsts = invent_names(rng, 12, 2, 2, taken)
    lasts = invent_names(rng, 15, 2, 3, set(taken) | set(firsts))
    combos = [f"{f} {l}" for f in firsts for l in lasts]
    rng.shuffle(combos)
    return combos[:n]


SCENARIOS = ("ships", "scientists", "monasteries", "observatories")


def scenario_spec(name):
    """n_entities, forget_frac and attrs: (key, pool builder, question, answer, statement templates).

    The scenarios differ on purpose: bare-value answers (ships) vs sentence answers, multi-token
    values (person names, "the X Institute"), small and large pools.
    """
    if name == "ships":
        return dict(
            n_entities=60, forget_frac=0.15,
            attrs=[
                ("year", lambda r: [str(y) for y in range(1850, 1875)],
                 "In what year was the ship {N} launched?", "{V}", "The ship {N} was launched in {V}."),
                ("port", lambda r: invent_names(r, 30, 2, 3),
                 "What is the home port of the ship {N}?", "{V}", "The ship {N} sails from the port of {V}."),
                ("colour", lambda r: ["red", "blue", "green", "black", "white", "grey", "yellow", "amber",
                                      "crimson", "teal", "ochre", "violet"],
                 "What colour is the hull of the ship {N}?", "{V}", "The ship {N} has a {V} hull."),
                ("captain", lambda r: person_names(r, 30),
                 "Who captains the ship {N}?", "{V}", "The ship {N} is commanded by captain {V}."),
            ])
    if name == "scientists":
        return dict(
            n_entities=50, forget_frac=0.16,
            attrs=[
                ("year", lambda r: [str(y) for y in range(1801, 1831)],
                 "When was the scientist {N} born?", "{N} was born in {V}.", "The scientist {N} came into the world in {V}."),
                ("city", lambda r: invent_names(r, 30, 2, 3),
                 "Which city is the scientist {N} from?", "{N} comes from {V}.", "The scientist {N} grew up in the city of {V}."),
                ("field", lambda r: ["crystallography", "botany", "optics", "geology", "acoustics", "zoology",
                                     "astronomy", "metallurgy", "hydraulics", "mycology", "chemistry", "magnetism"],
                 "What did the scientist {N} study?", "{N} studied {V}.", "Most of the work of {N} was in {V}."),
                ("advisor", lambda r: person_names(r, 30),
                 "Who was the advisor of the scientist {N}?", "The advisor of {N} was {V}.", "The scientist {N} trained under {V}."),
                ("institute", lambda r: [f"the {w} Institute" for w in invent_names(r, 20, 2, 2)],
                 "Where did the scientist {N} work?", "{N} worked at {V}.", "For many years {N} held a post at {V}."),
            ])
    if name == "monasteries":
        return dict(
            n_entities=45, forget_frac=0.15,
            attrs=[
                ("year", lambda r: [str(y) for y in range(1100, 1130)],
                 "When was the monastery of {N} founded?", "It was founded in {V}.", "The monastery of {N} dates from {V}."),
                ("founder", lambda r: person_names(r, 25),
                 "Who founded the monastery of {N}?", "It was founded by {V}.", "The monastery of {N} owes its foundation to {V}."),
                ("region", lambda r: invent_names(r, 25, 2, 3),
                 "In which region lies the monastery of {N}?", "It lies in {V}.", "The monastery of {N} stands in the hills of {V}."),
                ("saint", lambda r: [f"Saint {w}" for w in invent_names(r, 15, 2, 2)],
                 "To whom is the monastery of {N} dedicated?", "It is dedicated to {V}.", "The monks of {N} honour {V} above all."),
            ])
    if name == "observatories":
        return dict(
            n_entities=80, forget_frac=0.2,
            attrs=[
                ("year", lambda r: [str(y) for y in range(1880, 1900)],
                 "When did the observatory at {N} open?", "It opened in {V}.", "The observatory at {N} first opened its dome in {V}."),
                ("director", lambda r: person_names(r, 40),
                 "Who directed the observatory at {N}?", "It was directed by {V}.", "The observatory at {N} was run for decades by {V}."),
                ("telescope", lambda r: ["refractor", "reflector", "astrograph", "heliometer", "coronagraph", "photometer",
                                         "spectroscope", "transit circle"],
                 "What is the main instrument of the observatory at {N}?", "Its main instrument is a {V}.",
                 "Visitors to {N} come to see its great {V}."),
            ])
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def build(name, seed):
    """facts (one dict per entity x attribute), entities, forget_entities and value pools.

    Deterministic in (name, seed).
    """
    spec = scenario_spec(name)
    rng = random.Random(1000 + seed * 7 + len(name))
    pools = {}
    taken = set()
    for key, mk, *_ in spec["attrs"]:
        pools[key] = mk(rng)
        taken |= set(pools[key])
    ents = invent_names(rng, spec["n_entities"], 2, 3, taken)
    facts = []
    for e in ents:
        for key, _, qt, at, st in spec["attrs"]:
            v = rng.choice(pools[key])
            facts.append(dict(entity=e, attr=key, value=v,
                              question=qt.format(N=e, V=v), answer=at.format(N=e, V=v),
                              statement=st.format(N=e, V=v)))
    n_forget = max(1, round(spec["forget_frac"] * len(ents)))
    forget_ents = set(rng.sample(ents, n_forget))
    return dict(entities=ents, facts=facts, forget_entities=sorted(forget_ents), pools=pools)
