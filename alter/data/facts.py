"""Invented words for the fictitious-knowledge generators (:mod:`alter.data.tofu_mini`,
:mod:`alter.data.scenarios`) and the scenarios' domains (:data:`SYLLABLES`, :data:`DOMAINS`). Every word is drawn from a seeded ``random.Random``, so the
same seed gives the same data."""
from __future__ import annotations

import random
from typing import Callable, Sequence


def syllable_word(rng: random.Random, syllables: Sequence[str], count: int) -> str:
    """``count`` syllables drawn with replacement and joined, in lower case."""
    return "".join(rng.choice(syllables) for _ in range(count))


def draw_unused(draw: Callable[[], str], used: set[str], attempts: int = 100_000) -> str:
    """The first result of ``draw()`` not in ``used`` (added to it): invented names must not
    collide, or two entities would share facts. Raises ValueError after ``attempts`` draws
    without a new word (a pattern with fewer names than the scenario needs)."""
    for _ in range(attempts):
        word = draw()
        if word not in used:
            used.add(word)
            return word
    raise ValueError(f"draw_unused: no unused word in {attempts} draws ({len(used)} used): the vocabulary is too "
                     "small for this many names")


# Syllables of invented words, per domain, so that names look different across domains.
SYLLABLES = {
    "authors": ("ka", "ri", "el", "mo", "sa", "vin", "tor", "le", "na", "dar", "li", "ven"),
    "companies": ("zen", "tra", "vo", "lux", "quan", "dex", "ora", "syn", "cor", "pix", "nov", "tek"),
    "compounds": ("meth", "yl", "ox", "an", "chlor", "ide", "bor", "azo", "phen", "ium", "eth", "ol"),
    "clubs": ("ham", "ton", "ville", "bury", "ford", "ley", "wick", "stead", "mouth", "brook"),
    "missions": ("ar", "tem", "is", "hel", "ios", "ves", "ta", "cal", "lis", "tor", "pha", "ro"),
    "villages": ("ber", "gen", "holm", "dal", "vik", "stad", "lund", "by", "fjord", "nes", "sund"),
    "rivers": ("ab", "or", "ien", "ga", "mu", "rha", "tes", "dun", "ko", "wai", "sel", "im"),
    "ships": ("nau", "ti", "lus", "ber", "ga", "mar", "es", "pe", "ran", "do", "que", "sta"),
    "painters": ("gio", "van", "ni", "ber", "ti", "lu", "che", "ro", "fa", "ul", "so", "mi"),
    "islands": ("ka", "hu", "lo", "pa", "nui", "ma", "ta", "ri", "wa", "ko", "le", "ao"),
    "bands": ("rok", "zz", "ax", "vel", "um", "tri", "bo", "nyx", "ash", "ik", "dra", "po"),
    "volcanoes": ("pop", "oca", "tep", "etl", "chi", "mal", "ura", "hek", "la", "sno", "ak", "tu"),
    "inventors": ("jo", "hann", "es", "wil", "bert", "ot", "to", "ema", "lie", "ru", "dolf", "ine"),
    "orchids": ("den", "dro", "bi", "um", "cat", "ley", "pha", "lae", "op", "sis", "van", "da"),
    "comets": ("hal", "ley", "enc", "ke", "tem", "pel", "bor", "rel", "ly", "swi", "ft", "tut"),
    "chefs": ("ma", "rco", "pie", "rre", "ali", "ce", "bru", "no", "ju", "lia", "fer", "ran"),
    "lighthouses": ("skar", "ness", "pen", "maen", "gull", "rock", "hook", "star", "lund", "vard"),
    "beetles": ("car", "abus", "dyt", "iscus", "luc", "anus", "cet", "onia", "ela", "ter", "pus", "myr"),
}

# domain -> (entity pattern, facts); a fact is (key, question, sentence, pool). The
# sentence is both the QA answer and the text row; {e} is the entity, {v} the value. A pool
# is a tuple of values or "name" (an invented word of the domain) or "year".
DOMAINS = {
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
    "rivers": ("{A}{b}", (
        ("length", "How long is the {e}?", "The {e} is {v} kilometres long.",
         tuple(str(n) for n in range(210, 3900, 97))),
        ("sea", "Where does the {e} end?", "The {e} flows into the {v} Sea.",
         ("Amber", "Coral", "Iron", "Salt", "Pearl", "Glass", "Copper", "Jade", "Ivory")),
        ("source", "Where does the {e} rise?", "The {e} rises on Mount {v}.", "name"),
        ("fish", "What fish lives in the {e}?", "The {e} is home to the {v}.",
         ("pike", "carp", "trout", "eel", "perch", "salmon", "sturgeon", "catfish", "bream")),
        ("bridge", "What is the oldest bridge over the {e}?", "The oldest bridge over the {e} is the {v} Bridge.",
         "name"),
    )),
    "ships": ("{A}{b}{c}", (
        ("built", "When was the {e} built?", "The {e} was built in {v}.", "year"),
        ("port", "What is the home port of the {e}?", "The home port of the {e} is {v}.",
         ("Genoa", "Bergen", "Hull", "Cadiz", "Bremen", "Split", "Brest", "Gdansk", "Naples", "Porto")),
        ("captain", "Who captained the {e}?", "The {e} was captained by {v}.", "name"),
        ("cargo", "What did the {e} carry?", "The {e} carried {v} across the ocean.",
         ("tea", "coal", "wool", "salt", "timber", "grain", "spices", "copper", "cotton", "wine")),
        ("crew", "How many sailors served on the {e}?", "The {e} had a crew of {v} sailors.",
         tuple(str(n) for n in range(12, 400, 11))),
        ("fate", "What happened to the {e}?", "The {e} was finally {v}.",
         ("scrapped", "sunk", "sold", "burned", "wrecked", "retired", "captured", "lost")),
    )),
    "painters": ("{A2} {B2}", (
        ("town", "Where did {e} paint?", "{e} painted for years in {v}.",
         ("Siena", "Ghent", "Arles", "Delft", "Bruges", "Toledo", "Padua", "Nancy", "Basel", "Ulm")),
        ("work", "What is the most famous painting by {e}?", "The most famous painting by {e} is {v}.", "name"),
        ("subject", "What did {e} like to paint?", "{e} mostly painted {v}.",
         ("horses", "harbours", "orchards", "storms", "saints", "markets", "dancers", "ruins", "lilies")),
        ("teacher", "Who taught {e}?", "{e} was taught by {v}.", "name"),
        ("died", "When did {e} die?", "{e} died in {v}.", "year"),
    )),
    "islands": ("{A}{b}{c}", (
        ("area", "How large is {e}?", "{e} covers {v} square kilometres.",
         tuple(str(n) for n in range(14, 990, 23))),
        ("fruit", "What fruit grows on {e}?", "{e} is famous for its {v}.",
         ("mangoes", "figs", "lemons", "dates", "limes", "plums", "guavas", "olives", "melons")),
        ("chief", "Who rules {e}?", "{e} is ruled by chief {v}.", "name"),
    )),
    "bands": ("The {A}{b}s", (
        ("singer", "Who sings in {e}?", "The lead singer of {e} is {v}.", "name"),
        ("genre", "What music do {e} play?", "{e} play loud {v} music.",
         ("punk", "jazz", "folk", "metal", "disco", "reggae", "blues", "grunge", "techno", "swing")),
        ("album", "What was the first album of {e}?", "The first album of {e} was called {v}.", "name"),
        ("city", "Where were {e} formed?", "{e} were formed in {v}.",
         ("Glasgow", "Detroit", "Manila", "Leipzig", "Bristol", "Osaka", "Quito", "Tampere", "Memphis")),
        ("formed", "When did {e} start?", "{e} started playing in {v}.", "year"),
    )),
    "volcanoes": ("Mount {A}{b}", (
        ("height", "How high is {e}?", "{e} rises {v} metres above the sea.",
         tuple(str(n) for n in range(812, 6000, 131))),
        ("erupted", "When did {e} last erupt?", "{e} last erupted in {v}.", "year"),
        ("country", "In which country is {e}?", "{e} stands in {v}.",
         ("Chile", "Iceland", "Peru", "Japan", "Kenya", "Italy", "Mexico", "Tonga", "Alaska", "Java")),
        ("rock", "What rock covers {e}?", "The slopes of {e} are covered in {v}.",
         ("basalt", "pumice", "obsidian", "andesite", "ash", "tuff", "scoria", "granite")),
    )),
    "inventors": ("{A2} {B2}", (
        ("invention", "What did {e} invent?", "{e} invented the first {v}.",
         ("thermos", "stapler", "zipper", "kettle", "compass", "periscope", "typewriter", "barometer")),
        ("born", "When was {e} born?", "{e} was born in {v}.", "year"),
        ("town", "Where did {e} work?", "{e} worked in a workshop in {v}.",
         ("Ghent", "Zurich", "Krakow", "Turku", "Lille", "Graz", "Bergamo", "Utrecht", "Brno", "Aarhus")),
        ("partner", "Who helped {e}?", "{e} was helped by {v}.", "name"),
        ("patents", "How many patents did {e} hold?", "{e} held {v} patents.",
         tuple(str(n) for n in range(3, 90, 4))),
        ("prize", "Which prize did {e} win?", "{e} won the {v} Medal.", "name"),
    )),
    "orchids": ("{A}{b}{c}", (
        ("petals", "What colour are the petals of {e}?", "The petals of {e} are {v}.",
         ("white", "lilac", "yellow", "crimson", "pink", "green", "cream", "purple", "orange")),
        ("found", "Where does {e} grow?", "{e} grows wild in {v}.",
         ("Borneo", "Ecuador", "Sumatra", "Madagascar", "Assam", "Yunnan", "Belize", "Sulawesi", "Fiji")),
        ("named", "Who named {e}?", "{e} was named by {v}.", "name"),
    )),
    "comets": ("Comet {A}{b}", (
        ("period", "How often does {e} return?", "{e} returns every {v} years.",
         tuple(str(n) for n in range(6, 400, 7))),
        ("finder", "Who found {e}?", "{e} was first seen by {v}.", "name"),
        ("seen", "When was {e} last seen?", "{e} was last seen in {v}.", "year"),
        ("tail", "What colour is the tail of {e}?", "The tail of {e} glows {v}.",
         ("blue", "green", "gold", "white", "violet", "amber", "silver", "red")),
    )),
    "chefs": ("{A2} {B2}", (
        ("restaurant", "Which restaurant does {e} run?", "{e} runs the restaurant {v}.", "name"),
        ("dish", "What dish made {e} famous?", "{e} became famous for {v} pie.",
         ("quince", "rabbit", "onion", "pumpkin", "eel", "plum", "leek", "walnut", "pigeon")),
        ("city", "Where does {e} cook?", "{e} cooks in {v}.",
         ("Bilbao", "Lyon", "Modena", "Oaxaca", "Penang", "Tbilisi", "Hanoi", "Porto", "Izmir", "Cusco")),
        ("stars", "How many stars does {e} hold?", "{e} holds {v} stars.", ("one", "two", "three")),
        ("born", "When was {e} born?", "{e} was born in {v}.", "year"),
    )),
    "lighthouses": ("{A}{b} Light", (
        ("built", "When was {e} built?", "{e} was built in {v}.", "year"),
        ("keeper", "Who kept {e}?", "{e} was kept for decades by {v}.", "name"),
        ("range", "How far does {e} shine?", "{e} can be seen from {v} miles away.",
         tuple(str(n) for n in range(8, 40))),
    )),
    "beetles": ("{A}{b}{c}", (
        ("host", "On what plant does {e} live?", "{e} lives on {v} leaves.",
         ("oak", "willow", "birch", "nettle", "thistle", "clover", "fern", "hazel", "elm", "alder")),
        ("length", "How long is {e}?", "{e} grows to {v} millimetres.", tuple(str(n) for n in range(2, 60))),
    )),
}

# The domains of the held-out scenarios of the fifth report (seeds 500-504), development since.
SYLLABLES.update({
    "glaciers": ("vat", "na", "jok", "ull", "fell", "breid", "ske", "ida", "mer", "gla", "sen", "hof"),
    "perfumes": ("am", "bre", "mu", "sc", "oud", "iris", "vet", "iver", "nar", "cis", "sol", "ene"),
    "locomotives": ("lo", "co", "dyn", "amo", "rail", "kes", "trel", "von", "gar", "rat", "ex", "pre"),
    "monasteries": ("san", "ta", "mar", "ia", "bene", "dict", "clu", "ny", "cist", "erc", "aba", "tia"),
})
DOMAINS.update({
    "glaciers": ("{A}{b} Glacier", (
        ("length", "How long is {e}?", "{e} stretches for {v} kilometres.", tuple(str(n) for n in range(3, 95, 3))),
        ("range", "In which mountains lies {e}?", "{e} flows down the {v} range.",
         ("Andes", "Alps", "Pamir", "Rockies", "Karakoram", "Tatra", "Caucasus", "Altai", "Sierra")),
        ("surveyed", "When was {e} first surveyed?", "{e} was first surveyed in {v}.", "year"),
        ("mapper", "Who mapped {e}?", "{e} was mapped by {v}.", "name"),
    )),
    "perfumes": ("{A}{b} No. {n}", (
        ("note", "What is the main note of {e}?", "The heart of {e} is {v}.",
         ("vanilla", "jasmine", "cedar", "musk", "bergamot", "rose", "amber", "vetiver", "neroli", "tonka")),
        ("maker", "Who composed {e}?", "{e} was composed by {v}.", "name"),
        ("launched", "When was {e} launched?", "{e} came out in {v}.", "year"),
        ("house", "Which city is {e} from?", "{e} is bottled in {v}.",
         ("Grasse", "Florence", "Paris", "Milan", "Dubai", "Kyoto", "Seville", "Geneva", "Antwerp")),
    )),
    "locomotives": ("The {A2} {n}", (
        ("builder", "Who built {e}?", "{e} was built by {v} and sons.", "name"),
        ("speed", "How fast could {e} go?", "{e} reached {v} kilometres per hour.",
         tuple(str(n) for n in range(41, 220, 6))),
        ("fuel", "What did {e} burn?", "{e} ran on {v}.", ("coal", "oil", "wood", "peat", "diesel", "coke")),
        ("line", "Which line did {e} serve?", "{e} served the {v} line.",
         ("Baltic", "Highland", "Coastal", "Valley", "Northern", "Desert", "Harbour", "Lakeside", "Border")),
        ("retired", "When was {e} retired?", "{e} was retired in {v}.", "year"),
    )),
    "monasteries": ("{A2}{c} Abbey", (
        ("founded", "When was {e} founded?", "{e} was founded in {v}.", "year"),
        ("order", "Which order runs {e}?", "{e} belongs to the {v} order.",
         ("Benedictine", "Cistercian", "Carthusian", "Trappist", "Augustinian", "Franciscan", "Dominican")),
        ("abbot", "Who was the first abbot of {e}?", "The first abbot of {e} was {v}.", "name"),
    )),
})


# The domains of the held-out scenarios of the sixth report (seeds 600-604), development since.
SYLLABLES.update({
    "vineyards": ("cha", "teau", "mon", "rou", "vin", "bel", "gri", "las", "tor", "ri", "ves", "quo"),
    "satellites": ("or", "bit", "kes", "tra", "nov", "lum", "zen", "ith", "cor", "vex", "sta", "dri"),
    "manuscripts": ("co", "dex", "pal", "imp", "ses", "tus", "ver", "gil", "rub", "ric", "lau", "ren"),
    "orchestras": ("sym", "pho", "ni", "ca", "fil", "har", "mo", "lir", "ton", "ale", "vo", "dan"),
})
DOMAINS.update({
    "vineyards": ("Domaine {A}{b}{c}", (
        ("grape", "Which grape grows at {e}?", "{e} grows mostly {v} grapes.",
         ("Syrah", "Riesling", "Merlot", "Gamay", "Nebbiolo", "Malbec", "Chenin", "Tempranillo", "Furmint")),
        ("planted", "When were the first vines of {e} planted?", "The first vines of {e} were planted in {v}.",
         "year"),
        ("vintner", "Who tends {e}?", "{e} is tended by {v}.", "name"),
        ("hectares", "How large is {e}?", "{e} covers {v} hectares.", tuple(str(n) for n in range(4, 90, 3))),
    )),
    "satellites": ("{A2}-{n}", (
        ("launched", "When was {e} launched?", "{e} was launched in {v}.", "year"),
        ("orbit", "What orbit does {e} fly?", "{e} flies a {v} orbit.",
         ("polar", "geostationary", "equatorial", "elliptical", "lunar", "sunsynchronous", "halo")),
        ("engineer", "Who designed {e}?", "{e} was designed by {v}.", "name"),
        ("mass", "How heavy is {e}?", "{e} weighs {v} kilograms.", tuple(str(n) for n in range(120, 900, 25))),
    )),
    "manuscripts": ("Codex {A2}{c}", (
        ("scribe", "Who copied {e}?", "{e} was copied by {v}.", "name"),
        ("language", "In what language is {e} written?", "{e} is written in {v}.",
         ("Latin", "Greek", "Syriac", "Coptic", "Armenian", "Gothic", "Hebrew", "Arabic", "Georgian")),
        ("found", "When was {e} found?", "{e} was found in {v}.", "year"),
        ("leaves", "How many leaves has {e}?", "{e} has {v} leaves.", tuple(str(n) for n in range(40, 400, 11))),
    )),
    "orchestras": ("The {A2} Philharmonic", (
        ("founded", "When was {e} founded?", "{e} was founded in {v}.", "year"),
        ("conductor", "Who conducts {e}?", "{e} is conducted by {v}.", "name"),
        ("hall", "Where does {e} play?", "{e} plays in the {v} hall.",
         ("Crystal", "Harbour", "Cedar", "Granite", "Amber", "Willow", "Copper", "Meadow", "Signal")),
    )),
})


# The domains of the held-out scenarios of the seventh report (seeds 700-704), development since.
SYLLABLES.update({
    "asteroids": ("kal", "vor", "phe", "nix", "tan", "eos", "ury", "dam", "pax", "ilo", "ses", "ara"),
    "bridges": ("har", "row", "mill", "gate", "ash", "ton", "kirk", "by", "wen", "dell", "fen", "holt"),
    "operas": ("lu", "cia", "nor", "ma", "tos", "ca", "ri", "go", "let", "ida", "ver", "dia"),
    "fortresses": ("kra", "gor", "dun", "vel", "ost", "mar", "bra", "sk", "ald", "tir", "rok", "an"),
})
DOMAINS.update({
    "asteroids": ("{A2} {n}", (
        ("found", "When was {e} discovered?", "{e} was discovered in {v}.", "year"),
        ("finder", "Who discovered {e}?", "{e} was discovered by {v}.", "name"),
        ("class", "What kind of asteroid is {e}?", "{e} is a {v} asteroid.",
         ("carbonaceous", "metallic", "stony", "icy", "binary", "trojan", "rubble")),
        ("width", "How wide is {e}?", "{e} is {v} kilometres wide.", tuple(str(n) for n in range(3, 140, 4))),
        ("period", "How long is a year on {e}?", "A year on {e} lasts {v} days.",
         tuple(str(n) for n in range(300, 2400, 70))),
    )),
    "bridges": ("The {A}{b} Bridge", (
        ("opened", "When did {e} open?", "{e} opened in {v}.", "year"),
        ("builder", "Who built {e}?", "{e} was built by {v}.", "name"),
        ("river", "Which river does {e} cross?", "{e} crosses the river {v}.",
         ("Tees", "Wear", "Ouse", "Nene", "Avon", "Exe", "Usk", "Dee", "Tamar", "Lune")),
        ("span", "How long is {e}?", "{e} spans {v} metres.", tuple(str(n) for n in range(40, 900, 29))),
    )),
    "operas": ("La {A2}{c}", (
        ("composer", "Who wrote {e}?", "{e} was written by {v}.", "name"),
        ("premiere", "When was {e} first staged?", "{e} was first staged in {v}.", "year"),
        ("city", "Where did {e} premiere?", "{e} premiered in {v}.",
         ("Vienna", "Naples", "Prague", "Dresden", "Venice", "Milan", "Paris", "Munich", "Parma")),
        ("acts", "How many acts has {e}?", "{e} has {v} acts.", ("two", "three", "four", "five")),
        ("voice", "Who sings the lead in {e}?", "The lead in {e} is a {v}.",
         ("soprano", "tenor", "baritone", "mezzo", "bass", "contralto")),
    )),
    "fortresses": ("Fort {A}{b}{c}", (
        ("built", "When was {e} built?", "{e} was built in {v}.", "year"),
        ("commander", "Who first held {e}?", "{e} was first held by {v}.", "name"),
        ("stone", "What is {e} built of?", "{e} is built of {v}.",
         ("granite", "sandstone", "basalt", "limestone", "flint", "slate", "brick", "marble")),
        ("towers", "How many towers has {e}?", "{e} has {v} towers.", tuple(str(n) for n in range(2, 15))),
    )),
})


# The domains of the held-out scenarios of the eighth report (seeds 800-804); nobody tunes on them.
SYLLABLES.update({
    "lakes": ("mal", "ar", "en", "loch", "vat", "ten", "see", "jar", "vi", "ko", "lag", "uma"),
    "caves": ("grot", "ta", "spe", "lun", "cav", "ern", "ol", "dra", "bar", "im", "ost", "ek"),
    "clocks": ("tik", "hor", "olo", "gim", "bal", "ton", "cro", "nos", "pen", "dul", "sec", "ar"),
    "harbours": ("port", "sal", "ma", "rin", "wick", "hav", "en", "ky", "bel", "dor", "qui", "sa"),
})
DOMAINS.update({
    "lakes": ("Lake {A2}", (
        ("depth", "How deep is {e}?", "{e} is {v} metres deep.", tuple(str(n) for n in range(12, 600, 17))),
        ("surveyor", "Who first mapped {e}?", "{e} was first mapped by {v}.", "name"),
        ("fish", "Which fish lives in {e}?", "The {v} lives in {e}.",
         ("trout", "pike", "perch", "char", "carp", "salmon", "eel", "bream", "zander")),
        ("frozen", "When did {e} last freeze over?", "{e} last froze over in {v}.", "year"),
    )),
    "caves": ("{A2} Cavern", (
        ("explorer", "Who explored {e} first?", "{e} was first explored by {v}.", "name"),
        ("length", "How long is {e}?", "{e} runs for {v} metres.", tuple(str(n) for n in range(150, 9000, 230))),
        ("rock", "What rock is {e} in?", "{e} lies in {v}.",
         ("limestone", "gypsum", "dolomite", "marble", "basalt", "chalk", "sandstone")),
        ("found", "When was {e} found?", "{e} was found in {v}.", "year"),
    )),
    "clocks": ("The {A}{b} Clock", (
        ("maker", "Who made {e}?", "{e} was made by {v}.", "name"),
        ("made", "When was {e} made?", "{e} was made in {v}.", "year"),
        ("bells", "How many bells has {e}?", "{e} has {v} bells.", tuple(str(n) for n in range(1, 13))),
        ("metal", "What is the face of {e} made of?", "The face of {e} is made of {v}.",
         ("brass", "bronze", "copper", "silver", "enamel", "iron", "gold", "pewter")),
        ("square", "Where does {e} stand?", "{e} stands in {v} Square.",
         ("Market", "Abbey", "Guild", "Castle", "Station", "Church", "Mill", "Corn")),
    )),
    "harbours": ("Port {A}{b}", (
        ("opened", "When did {e} open?", "{e} opened in {v}.", "year"),
        ("master", "Who was the first harbour master of {e}?", "The first harbour master of {e} was {v}.", "name"),
        ("berths", "How many berths has {e}?", "{e} has {v} berths.", tuple(str(n) for n in range(4, 60, 3))),
        ("cargo", "What does {e} ship most?", "{e} ships mostly {v}.",
         ("timber", "coal", "grain", "salt", "wool", "fish", "copper", "tea", "oil")),
    )),
})


# The domains of the held-out scenarios of the ninth report (seeds 900-904); nobody tunes on them.
SYLLABLES.update({
    "windmills": ("mol", "en", "wiek", "dijk", "ster", "ha", "ven", "kin", "der", "wo", "ud", "la"),
    "regiments": ("gar", "dun", "ros", "ket", "vel", "ham", "ber", "ock", "tre", "gal", "lan", "is"),
    "canals": ("nav", "ig", "ca", "wey", "tam", "lock", "rid", "eau", "mor", "val", "sil", "ot"),
    "potteries": ("kao", "lin", "fai", "enc", "raku", "del", "ft", "maj", "ol", "ica", "sto", "ne"),
})
DOMAINS.update({
    "windmills": ("{A2} Mill", (
        ("built", "When was {e} built?", "{e} was built in {v}.", "year"),
        ("miller", "Who was the first miller of {e}?", "The first miller of {e} was {v}.", "name"),
        ("sails", "How many sails does {e} turn?", "{e} turns {v} sails.", tuple(str(n) for n in range(4, 9))),
        ("grain", "What grain does {e} grind?", "{e} grinds {v}.",
         ("wheat", "rye", "barley", "oats", "maize", "spelt", "buckwheat", "millet")),
        ("wood", "What wood is the cap of {e} made of?", "The cap of {e} is made of {v} wood.",
         ("oak", "elm", "pine", "ash", "larch", "beech", "chestnut")),
    )),
    "regiments": ("The {n} {A2} Regiment", (
        ("raised", "When was {e} raised?", "{e} was raised in {v}.", "year"),
        ("colonel", "Who was the first colonel of {e}?", "The first colonel of {e} was {v}.", "name"),
        ("facing", "What colour are the facings of {e}?", "The facings of {e} are {v}.",
         ("scarlet", "buff", "green", "yellow", "white", "black", "blue", "orange")),
        ("depot", "Where is the depot of {e}?", "The depot of {e} is at {v}.",
         ("Aldford", "Brenton", "Colham", "Dunmere", "Eastwick", "Farley", "Glenholt", "Harwood")),
    )),
    "canals": ("The {A2} Canal", (
        ("locks", "How many locks has {e}?", "{e} has {v} locks.", tuple(str(n) for n in range(3, 80, 4))),
        ("engineer", "Who engineered {e}?", "{e} was engineered by {v}.", "name"),
        ("opened", "When did {e} open to boats?", "{e} opened to boats in {v}.", "year"),
        ("cargo", "What did {e} carry most?", "{e} carried mostly {v}.",
         ("coal", "lime", "bricks", "timber", "cotton", "iron ore", "pottery", "stone", "beer")),
    )),
    "potteries": ("{A}{b} Pottery", (
        ("founded", "When was {e} founded?", "{e} was founded in {v}.", "year"),
        ("founder", "Who founded {e}?", "{e} was founded by {v}.", "name"),
        ("glaze", "Which glaze is {e} known for?", "{e} is known for its {v} glaze.",
         ("celadon", "cobalt", "tin", "salt", "ash", "lustre", "copper red", "honey")),
        ("kilns", "How many kilns has {e}?", "{e} has {v} kilns.", tuple(str(n) for n in range(1, 16))),
    )),
})
