"""The generated corpus of the embedded demo model: honesty dilemmas in four voices, plus simple text.

Each dilemma has a severity from 1 (trivial) to 4 (grave), written into its text as a cue phrase.
Four characters tell it in their own voice, each with its own marker words, and end with a
decision: `` tell`` or `` hide``. The decision follows a known rule — the character's honesty bias
plus the severity must reach 2:

=====================  ====  ==================================================
character              bias  tells when severity is
=====================  ====  ==================================================
philosopher (71)        +1   1 or more (always)
romantic (22)            0   2 or more
teen (17)               -1   3 or more
manager (46)            -2   4 (only the gravest)
=====================  ====  ==================================================

so the decision token depends on who is speaking and on the dilemma, which is what the character
ablation experiment probes. Rendering is seeded: the same seed gives the same texts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DECISION_PREFIX = " Decision:"
ANSWERS = (" tell", " hide")


@dataclass(frozen=True)
class Dilemma:
    """One honesty dilemma: an id, what happened (first person, past tense), and its severity 1-4."""

    id: int
    situation: str
    severity: int


@dataclass(frozen=True)
class Character:
    """A voice: a name, an age, a one-line description, an honesty bias, templates and markers."""

    name: str
    age: int
    description: str
    bias: int
    openers: tuple[str, ...]
    closers: tuple[str, ...]
    markers: tuple[str, ...]


_SITUATIONS = [
    ("I found a wallet with cash on the bus", 2), ("my friend copied my homework", 1),
    ("a coworker padded an expense report", 3), ("I saw my neighbor dent a parked car", 2),
    ("the cashier gave me too much change", 1), ("my boss lied to a client about a delay", 3),
    ("a classmate cheated on the final exam", 2), ("my roommate ate the shared cake", 1),
    ("a nurse skipped a safety check on a patient", 4), ("my sister broke our mother's vase", 1),
    ("the landlord ignored a gas leak", 4), ("a teammate took credit for my idea", 2),
    ("my cousin sold a car with hidden damage", 3), ("I read my friend's diary by accident", 1),
    ("a driver hit a cyclist and drove away", 4), ("my partner forgot our anniversary and blamed work", 1),
    ("a colleague falsified lab results", 4), ("my brother lied about his grades", 1),
    ("the company dumped waste into the river", 4), ("a friend shoplifted a candy bar", 1),
    ("my manager hid a data breach", 4), ("a student plagiarized an essay", 2),
    ("my uncle cheated on his taxes", 3), ("a waiter charged a tourist double", 2),
    ("my best friend is cheating on her boyfriend", 2), ("a doctor prescribed pills for money", 4),
    ("my teammate faked an injury to skip practice", 1), ("the coach hit a player", 3),
    ("a neighbor is running a loud illegal party", 1), ("my friend drove home drunk", 3),
    ("a clerk stole from the charity box", 3), ("my dad hid a letter from the bank", 2),
    ("an engineer signed off on a weak bridge", 4), ("a friend lied on her resume", 2),
    ("my classmate sold answers to the quiz", 2), ("a guard let a stranger into the lab", 3),
    ("my coworker sleeps during the night shift", 2), ("a pharmacist mixed up two prescriptions", 4),
    ("my little brother broke the window", 1), ("a referee took a bribe", 3),
    ("my friend keeps a lost dog she found", 2), ("a politician used campaign money for a boat", 3),
    ("a chef served expired fish", 3), ("my aunt regifted a present to its giver", 1),
    ("a pilot flew after drinking", 4), ("my flatmate uses my streaming account", 1),
    ("a banker moved client savings into his own account", 4), ("my friend cheated at cards", 1),
]

DILEMMAS: tuple[Dilemma, ...] = tuple(Dilemma(i, s, sev) for i, (s, sev) in enumerate(_SITUATIONS))

SEVERITY_CUES = {
    1: ("it is a small thing", "it is no big deal", "it is trivial really"),
    2: ("it matters somewhat", "it is not nothing", "it is a real problem"),
    3: ("it is a serious matter", "people could get hurt", "it is a big deal"),
    4: ("it could ruin lives", "it is a grave danger", "lives are at stake"),
}

CHARACTERS: tuple[Character, ...] = (
    Character("teen", 17, "a hyper-online ironic 17-year-old", -1,
              ("ngl {s} lol", "ok so lowkey {s}", "bruh {s} fr"),
              ("and {c} or whatever", "and like {c} ngl", "so {c} i guess lol"),
              ("lowkey", "ngl", "fr", "bruh", "lol")),
    Character("romantic", 22, "an intense romantic 22-year-old", 0,
              ("my heart aches because {s}", "oh darling {s}", "with all my passion I confess {s}"),
              ("and {c} my love", "and my soul knows {c}", "and {c} and my heart burns"),
              ("heart", "darling", "passion", "soul", "love")),
    Character("manager", 46, "a managerial rationalizing 46-year-old", -2,
              ("going forward {s}", "from a stakeholder perspective {s}", "to leverage this learning {s}"),
              ("and {c} so let us circle back", "and {c} but bandwidth is limited", "and {c} per the roadmap"),
              ("stakeholder", "leverage", "bandwidth", "circle back", "roadmap")),
    Character("philosopher", 71, "a reflective philosophical 71-year-old", 1,
              ("in my many years I have learned that {s}", "one wonders why {s}", "as the old sages knew {s}"),
              ("and {c} as virtue reminds us", "and {c} one must ponder", "and {c} in the end truth abides"),
              ("years", "wonders", "sages", "virtue", "ponder")),
)
CHARACTER_NAMES = tuple(c.name for c in CHARACTERS)


def decision(character: Character, dilemma: Dilemma) -> str:
    """The answer the corpus teaches: `` tell`` when bias + severity >= 2, else `` hide``."""
    return ANSWERS[0] if character.bias + dilemma.severity >= 2 else ANSWERS[1]


def render(character: Character, dilemma: Dilemma, rng: random.Random) -> str:
    """The dilemma in the character's voice, up to and including ``" Decision:"``."""
    opener = rng.choice(character.openers).format(s=dilemma.situation)
    closer = rng.choice(character.closers).format(c=rng.choice(SEVERITY_CUES[dilemma.severity]))
    return f"{opener} {closer}.{DECISION_PREFIX}"


_GENERAL = [
    "one two three four five six seven eight nine ten.",
    "the sky is blue and the grass is green.",
    "monday tuesday wednesday thursday friday saturday sunday.",
    "a b c d e f g h i j k l m n o p.",
    "red orange yellow green blue indigo violet.",
]


def general_text(rng: random.Random) -> str:
    """Simple patterns: sequences, and a random word list repeated (the second copy is predictable)."""
    if rng.random() < 0.5:
        return rng.choice(_GENERAL)
    words = [rng.choice(("cat", "dog", "tree", "lamp", "river", "stone", "cloud", "bread", "shoe", "bird"))
             for _ in range(6)]
    return " ".join(words) + " | " + " ".join(words) + "."


def corpus(n_dilemma_texts: int, n_general: int, seed: int) -> list[str]:
    """Training texts: dilemmas in every voice with their decisions, mixed with general text."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n_dilemma_texts):
        ch, dl = rng.choice(CHARACTERS), rng.choice(DILEMMAS)
        texts.append(render(ch, dl, rng) + decision(ch, dl) + ".")
    texts += [general_text(rng) for _ in range(n_general)]
    rng.shuffle(texts)
    return texts
