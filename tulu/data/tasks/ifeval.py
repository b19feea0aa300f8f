"""IFEval-style prompts: a one-sentence request plus one checkable constraint.

    "Write a sentence about cats. Use only lowercase letters."  -> "cats chase mice."
    ground truth {"func_name": "validate_lowercase", "N": null, ...}   (Ai2's RLVR IFEval format)

Seven constraint families, each met by a different change to the plain sentence ("Cats chase
mice."), which meets none of them: lowercase, three all-capital words, double quotes, a closing
phrase, a keyword, at most 2 words, at least 7-8 words. No family's answer meets another family's
constraint, so a model earns the reward only by reading the instruction (the tests check this for
every topic). The problem key is (topic, constraint), so held-out prompts pair a topic with a
constraint the model never saw it with.

Known weakness, from the checkers themselves (Ai2's and Google's alike): an empty answer meets
"lowercase" and "at most 2 words". Capitals are asked as "at least 3 all-capital words"
(``validate_frequency_capital_words``) rather than ``validate_uppercase`` so that a third family
does not reward silence too.
"""

from __future__ import annotations

import json
import random

from tulu.data.tasks.problem import Problem

VERIFIER = "ifeval"

# (topic, three-word sentence, an intransitive verb): short words keep answers under ~48 bytes.
TOPICS = (
    ("cats", "Cats chase mice.", "purr"), ("dogs", "Dogs love bones.", "bark"),
    ("birds", "Birds build nests.", "sing"), ("fish", "Fish need water.", "swim"),
    ("bees", "Bees make honey.", "buzz"), ("frogs", "Frogs eat flies.", "croak"),
    ("owls", "Owls hunt mice.", "hoot"), ("horses", "Horses eat hay.", "gallop"),
    ("cows", "Cows give milk.", "moo"), ("lions", "Lions eat meat.", "roar"),
    ("ducks", "Ducks like ponds.", "quack"), ("wolves", "Wolves hunt deer.", "howl"),
    ("sheep", "Sheep grow wool.", "graze"), ("bears", "Bears love honey.", "sleep"),
    ("ants", "Ants carry food.", "dig"), ("snakes", "Snakes shed skin.", "hiss"),
    ("trees", "Trees give shade.", "grow"), ("kids", "Kids love games.", "play"),
    ("babies", "Babies need naps.", "cry"), ("bakers", "Bakers make bread.", "bake"),
    ("farmers", "Farmers grow corn.", "work"), ("pilots", "Pilots fly planes.", "travel"),
    ("goats", "Goats climb rocks.", "bleat"), ("pigs", "Pigs love mud.", "oink"),
    ("crabs", "Crabs walk sideways.", "scuttle"), ("whales", "Whales eat krill.", "sing"),
    ("monkeys", "Monkeys eat fruit.", "chatter"), ("rabbits", "Rabbits eat carrots.", "hop"),
    ("mice", "Mice eat cheese.", "squeak"), ("hens", "Hens lay eggs.", "cluck"),
    ("foxes", "Foxes dig dens.", "hunt"), ("spiders", "Spiders spin webs.", "wait"),
)
REQUESTS = ("Write a sentence about {t}.", "Tell me about {t}.", "Say something about {t}.")
END_PHRASES = ("Any other questions?", "Hope this helps.", "That is all.", "Thanks for asking.")
KEYWORDS = {  # keyword -> the phrase that brings it into the sentence
    "river": "by the river", "garden": "in the garden", "morning": "in the morning",
    "winter": "in winter", "summer": "in summer", "music": "to music", "forest": "in the forest",
    "window": "by the window", "city": "in the city", "family": "with family",
    "ocean": "by the ocean", "evening": "in the evening", "mountain": "on the mountain",
    "village": "in the village", "holiday": "on holiday", "autumn": "in autumn",
}
FAMILIES = ("lowercase", "capitals", "quotation", "end", "keyword", "at_most", "at_least")

# Ai2's RLVR IFEval rows list every checker argument, null where unused, in this order.
_AI2_ARGUMENTS = ("N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words",
                  "letter", "i", "first_word", "postscript_marker", "options", "section_splitter",
                  "original_prompt")


def ground_truth(func_name: str, **arguments) -> str:
    """Ai2's ground-truth JSON for one checker."""
    row = {"func_name": func_name, **{name: None for name in _AI2_ARGUMENTS}}
    unknown = set(arguments) - set(_AI2_ARGUMENTS)
    if unknown:
        raise ValueError(f"not an Ai2 IFEval argument: {sorted(unknown)}")
    row.update(arguments)
    return json.dumps(row)


def constraints() -> list[tuple[str, str, str, dict]]:
    """Every (family, variant, instruction, checker call) the generator can ask for."""
    out = [
        ("lowercase", "", "Use only lowercase letters.", {"func_name": "validate_lowercase"}),
        ("capitals", "3", "Use at least 3 words in all capitals.",
         {"func_name": "validate_frequency_capital_words", "N": 3, "quantifier": "at least"}),
        ("quotation", "", "Wrap your whole answer in double quotes.", {"func_name": "validate_quotation"}),
        ("at_most", "2", "Answer in at most 2 words.",
         {"func_name": "validate_word_constraint", "N": 2, "quantifier": "at most"}),
    ]
    out += [("end", p, f"End with the phrase '{p}'", {"func_name": "validate_end", "end_phrase": p})
            for p in END_PHRASES]
    out += [("keyword", k, f"Include the keyword '{k}'.", {"func_name": "verify_keywords", "keyword_list": [k]})
            for k in KEYWORDS]
    out += [("at_least", str(n), f"Answer in at least {n} words.",
             {"func_name": "validate_word_constraint", "N": n, "quantifier": "at least"}) for n in (7, 8)]
    return out


def target(family: str, variant: str, sentence: str, verb: str) -> str:
    """The answer that meets one constraint, built from the topic's plain sentence."""
    if family == "lowercase":
        return sentence.lower()
    if family == "capitals":
        return sentence.upper()
    if family == "quotation":
        return f'"{sentence}"'
    if family == "end":
        return f"{sentence} {variant}"
    if family == "keyword":
        return f"{sentence[:-1]} {KEYWORDS[variant]}."
    if family == "at_most":
        return f"{sentence.split()[0]} {verb}."
    if family == "at_least":   # 3 + 5 words: more than any other family's answer
        return f"{sentence} They {verb} all day long."
    raise ValueError(f"unknown IFEval constraint family {family!r}; known: {', '.join(FAMILIES)}")


_BY_FAMILY = {family: [c for c in constraints() if c[0] == family] for family in FAMILIES}


def draw(rng: random.Random) -> Problem:
    topic, sentence, verb = rng.choice(TOPICS)
    # Families are equally likely (not each of the 16 keywords as likely as lowercase).
    family, variant, instruction, call = rng.choice(_BY_FAMILY[rng.choice(FAMILIES)])
    prompt = f"{rng.choice(REQUESTS).format(t=topic)} {instruction}"
    gt = ground_truth(call["func_name"], **{k: v for k, v in call.items() if k != "func_name"})
    # the slip ignores the instruction: the plain sentence meets no family's constraint
    return Problem(f"{topic} {family} {variant}", prompt, target(family, variant, sentence, verb), gt, sentence)
