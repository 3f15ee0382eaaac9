"""Build the quickstart study's embedded assets: a tiny pretrained base model and its data.

Run: ``python studies/quickstart/build.py`` (about 4 minutes on 2 idle CPU cores, 15 on
busy ones; no network).

Why this exists: budgetune must run end to end on a laptop with no GPU and no internet, and
its tests need a base model that has *learned something* (a random model makes every trial
look the same, so the search would have nothing to find). Downloading even the smallest hub
model is impossible here and would bring a licence along, so everything is generated:

1. a synthetic world of facts (fictional people with attributes, small-number arithmetic,
   plurals and antonyms of a shipped word list);
2. a pretraining corpus of plain prose stating those facts, plus a small share of documents
   that are the Alpaca template's fixed header sentences and ``### ...:`` markers alone
   (never with an instruction or a response);
3. a byte-level BPE tokenizer trained on that corpus, whose pre-tokenizer keeps each of the
   template's fixed phrases in one piece, so wrapping a question costs 6 tokens (9 with an
   input) rather than the 85 (125) of a tokenizer that never saw the template: finetuning
   compute goes to the questions and answers, not to the template;
4. a ~1M-parameter Llama model pretrained on the corpus, so it knows the facts and has seen
   the template's phrases, but not the question/answer format (that is LoRA's job);
5. instruction data asking about *some* facts, written in the real schemas of public
   datasets (Dolly-15k, Alpaca, OpenAssistant oasst1, FLAN) so the engine's real loaders
   are exercised; a validation set; and held-out / holdout eval sets asking about facts the
   instruction data never asks, so finetuning on the format should raise their scores.

Every random choice flows from ``SEED``; rerunning reproduces the data files byte for byte
(the model weights up to floating-point non-determinism of the CPU kernels).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from budgetune.engine.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

SEED = 1234
HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "model"
DATA_DIR = HERE / "data"

# Special tokens in Llama's order, so ids match what Llama-family code tends to assume.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
VOCAB_SIZE = 2000
MAX_POSITIONS = 512

# The Alpaca template's fixed text (engine/template.py), cut into the phrases the tokenizer
# keeps whole (so BPE learns each as one token). A marker takes the blank line before it but
# not the newline after it: lm-eval scores a choice by cutting the prompt's trailing
# whitespace off and tokenizing the prompt alone, which must give a prefix of the prompt and
# choice tokenized together, so a token must never span the end of a prompt.
TEMPLATE_HEADER = "Below is an instruction that describes a task"
TEMPLATE_PAIRED = ", paired with an input that provides further context"
TEMPLATE_WRITE = ". Write a response that appropriately completes the request."
TEMPLATE_MARKERS = ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:")
TEMPLATE_PHRASES = (TEMPLATE_HEADER, TEMPLATE_PAIRED, TEMPLATE_WRITE, *TEMPLATE_MARKERS)
_INSTRUCTION, _INPUT, _RESPONSE = TEMPLATE_MARKERS
# Fail the build (rather than ship a tokenizer that splits the template into words again)
# if engine/template.py changes.
assert PROMPT_NO_INPUT == (
    f"{TEMPLATE_HEADER}{TEMPLATE_WRITE}{_INSTRUCTION}\n{{instruction}}{_RESPONSE}\n"
), "engine/template.py changed: update TEMPLATE_* in studies/quickstart/build.py"
assert PROMPT_WITH_INPUT == (
    f"{TEMPLATE_HEADER}{TEMPLATE_PAIRED}{TEMPLATE_WRITE}{_INSTRUCTION}\n{{instruction}}"
    f"{_INPUT}\n{{input}}{_RESPONSE}\n"
), "engine/template.py changed: update TEMPLATE_* in studies/quickstart/build.py"
# Corpus documents that are template text alone (``template_documents``), this many of each
# of the four per round: 16 of ~710 documents, ~0.2% of the tokens. Enough for BPE to learn
# each phrase as one token and for the model to learn those tokens; none holds a question or
# an answer, so the model learns the template's text but not the task.
TEMPLATE_REPEATS = 4

# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

# 200 rather than more: with ~2M training tokens each attribute is then stated ~200 times,
# enough for a 1M-parameter model to memorise a good share of them (300 left most at chance).
N_ENTITIES = 200
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
FOODS = [
    "plums", "noodles", "cheese", "soup", "rice", "pancakes",
    "olives", "mangoes", "bread", "carrots", "honey", "dumplings",
]  # fmt: skip
SIZES = ["tiny", "small", "medium", "large", "huge"]
# No word here starts with a vowel, so "a {word}" is always grammatical.
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "goat", "horse", "hamster", "lizard", "fish"]
JOBS = [
    "baker", "farmer", "teacher", "painter", "sailor",
    "doctor", "builder", "singer", "tailor", "miner",
]  # fmt: skip
AGES = [str(n) for n in range(5, 96)]

# Singular -> plural. Mostly regular (so the rule is learnable), a few irregular.
PLURALS = {
    "cat": "cats", "dog": "dogs", "tree": "trees", "book": "books", "cup": "cups",
    "hat": "hats", "boat": "boats", "road": "roads", "door": "doors", "bird": "birds",
    "lamp": "lamps", "river": "rivers", "stone": "stones", "apple": "apples",
    "chair": "chairs", "table": "tables", "shoe": "shoes", "hill": "hills", "ring": "rings",
    "coat": "coats", "song": "songs", "drum": "drums", "frog": "frogs", "star": "stars",
    "cloud": "clouds", "garden": "gardens", "window": "windows", "candle": "candles",
    "bottle": "bottles", "basket": "baskets", "kettle": "kettles", "ladder": "ladders",
    "pencil": "pencils", "rocket": "rockets", "tower": "towers", "wagon": "wagons",
    "box": "boxes", "fox": "foxes", "bus": "buses", "dish": "dishes", "brush": "brushes",
    "church": "churches", "bench": "benches", "glass": "glasses", "watch": "watches",
    "match": "matches", "peach": "peaches", "kiss": "kisses", "wish": "wishes",
    "class": "classes", "tax": "taxes", "beach": "beaches", "bush": "bushes",
    "city": "cities", "baby": "babies", "party": "parties", "story": "stories",
    "lady": "ladies", "cherry": "cherries", "puppy": "puppies", "berry": "berries",
    "penny": "pennies", "family": "families", "country": "countries", "body": "bodies",
    "fly": "flies", "pony": "ponies", "army": "armies", "hobby": "hobbies",
    "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "sheep": "sheep",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "ox": "oxen", "loaf": "loaves",
    "shelf": "shelves", "calf": "calves", "deer": "deer", "moose": "moose",
}  # fmt: skip
ANTONYMS = [
    ("hot", "cold"), ("big", "little"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("open", "closed"), ("light", "dark"), ("wet", "dry"), ("early", "late"),
    ("hard", "soft"), ("heavy", "light"), ("young", "old"), ("rich", "poor"),
    ("loud", "quiet"), ("full", "empty"), ("strong", "weak"), ("tall", "short"),
    ("wide", "narrow"), ("clean", "dirty"), ("brave", "afraid"), ("first", "last"),
    ("inside", "outside"), ("push", "pull"), ("win", "lose"), ("buy", "sell"),
    ("give", "take"), ("start", "finish"), ("come", "go"), ("thick", "thin"),
    ("sweet", "sour"), ("deep", "shallow"), ("near", "far"), ("north", "south"),
    ("east", "west"), ("day", "night"), ("left", "right"), ("above", "below"),
    ("before", "after"), ("true", "false"), ("love", "hate"), ("laugh", "cry"),
    ("arrive", "leave"), ("asleep", "awake"), ("cheap", "expensive"), ("kind", "cruel"),
    ("noisy", "silent"), ("smooth", "rough"), ("sharp", "dull"), ("safe", "dangerous"),
    ("friend", "enemy"),
]  # fmt: skip
ARITH_MAX = 20

ATTRIBUTES = ["color", "city", "food", "size", "age", "pet", "job"]
# Which relations each eval family asks about. Training data asks about all of them (other
# facts). The holdout uses other relations *and* other question phrasings than the held-out
# set, so a search that overfits the held-out set's shape is caught.
HELDOUT_RELATIONS = ("color", "city", "food", "age", "sum", "plural")
HOLDOUT_RELATIONS = ("size", "pet", "job", "difference", "antonym")

# Prose that states a fact, for the pretraining corpus. {s}=subject, {v}=value.
STATEMENTS: dict[str, list[str]] = {
    "color": [
        "{s}'s favourite color is {v}.", "The favourite color of {s} is {v}.",
        "{s} likes the color {v} best.", "Of all colors, {s} loves {v} the most.",
    ],
    "city": [
        "{s} lives in {v}.", "{s}'s home city is {v}.", "The home of {s} is the city of {v}.",
        "{s} was born in {v} and still lives there.",
    ],
    "food": [
        "{s}'s favourite food is {v}.", "{s} loves to eat {v}.",
        "More than anything, {s} likes to eat {v}.", "For dinner {s} always wants {v}.",
    ],
    "size": [
        "{s} is {v}.", "In size, {s} is {v}.", "Everyone knows that {s} is {v}.",
        "People say {s} is {v} for their age.",
    ],
    "age": [
        "{s} is {v} years old.", "The age of {s} is {v}.", "{s} turned {v} this year.",
        "{s} has lived for {v} years.",
    ],
    "pet": [
        "{s} has a pet {v}.", "The pet of {s} is a {v}.", "{s} keeps a {v} at home.",
        "Every morning {s} feeds a pet {v}.",
    ],
    "job": [
        "{s} works as a {v}.", "{s} is a {v} by trade.", "The job of {s} is {v}.",
        "For many years {s} has been a {v}.",
    ],
    "sum": ["{s} is {v}.", "{s} equals {v}.", "If you add {s}, you get {v}."],
    "difference": ["{s} is {v}.", "{s} equals {v}.", "{s} leaves {v}."],
    "plural": [
        "The plural of {s} is {v}.", "One {s}, two {v}.", "We say one {s} but many {v}.",
    ],
    "antonym": [
        "The opposite of {s} is {v}.", "{s} is the opposite of {v}.",
        "The word {s} means the opposite of {v}.",
    ],
}  # fmt: skip

# Questions used by training data, the validation set and the held-out eval set.
QUESTIONS: dict[str, list[str]] = {
    "color": [
        "What is the favourite color of {s}?", "What color does {s} like best?",
        "Which color is {s}'s favourite?",
    ],
    "city": ["Where does {s} live?", "What is the home city of {s}?", "Which city is {s} from?"],
    "food": [
        "What is {s}'s favourite food?", "What does {s} love to eat?",
        "Which food does {s} like most?",
    ],
    "size": ["How big is {s}?", "What size is {s}?"],
    "age": ["How old is {s}?", "What is the age of {s}?"],
    "pet": ["What pet does {s} have?", "What kind of animal is {s}'s pet?"],
    "job": ["What is {s}'s job?", "What does {s} do for a living?"],
    "sum": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."],
    "difference": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}."],
    "plural": ["What is the plural of {s}?", "What is the plural form of the word {s}?"],
    "antonym": ["What is the opposite of {s}?", "What is an antonym of {s}?"],
}  # fmt: skip

# Phrasings that only the holdout set uses (never seen in training, val or held-out).
HOLDOUT_QUESTIONS: dict[str, list[str]] = {
    "size": ["Describe the size of {s} in one word.", "Tell me how large {s} is."],
    "pet": ["Name the animal that lives with {s}.", "Which animal does {s} look after?"],
    "job": ["Which profession does {s} have?", "Name the trade of {s}."],
    "difference": ["Compute {a} take away {b}.", "How much is left if you take {b} from {a}?"],
    "antonym": ["Give the word that means the opposite of {s}.", "Name the reverse of {s}."],
}


@dataclass(frozen=True)
class Fact:
    """One learnable fact: ``subject`` has ``answer`` under ``relation``."""

    relation: str
    subject: str
    answer: str
    unit: str
    """Facts sharing a unit go to the same split (3+4 and 4+3; hot/cold and cold/hot)."""
    a: int = 0
    b: int = 0

    def statement(self, rng: random.Random) -> str:
        """A random prose sentence stating this fact, for the pretraining corpus."""
        template = rng.choice(STATEMENTS[self.relation])
        return template.format(s=self.subject, v=self.answer)

    def question(self, rng: random.Random, holdout: bool = False) -> str:
        """A random question asking for this fact."""
        table = HOLDOUT_QUESTIONS if holdout else QUESTIONS
        template = rng.choice(table[self.relation])
        return template.format(s=self.subject, a=self.a, b=self.b)

    def sentence_answer(self) -> str:
        """A full-sentence answer (the first statement template), as Dolly answers are."""
        text = STATEMENTS[self.relation][0].format(s=self.subject, v=self.answer)
        return text[0].upper() + text[1:]


@dataclass
class World:
    """The generated facts, and the people they are about (kept for writing world.json)."""

    people: dict[str, dict[str, str]]
    cities: list[str]
    facts: list[Fact]


def make_name(rng: random.Random, n_syllables: int) -> str:
    """A pronounceable made-up name: consonant-vowel syllables with an optional final coda."""
    onsets = ["b", "br", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "", "n", "r", "l", "s", "m", "x", "nd", "th"]
    name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syllables))
    return (name + rng.choice(codas)).capitalize()


def make_world(rng: random.Random) -> World:
    """Draw people and their attributes, and enumerate arithmetic and word facts."""
    taken = set(PLURALS) | set(PLURALS.values()) | {w for pair in ANTONYMS for w in pair}
    cities: list[str] = []
    while len(cities) < 12:
        name = make_name(rng, 2) + rng.choice(["ford", "mere", "holm", "ton", "vale", "by"])
        if name.lower() not in taken:
            taken.add(name.lower())
            cities.append(name)
    values = {
        "color": COLORS, "city": cities, "food": FOODS, "size": SIZES,
        "age": AGES, "pet": PETS, "job": JOBS,
    }  # fmt: skip
    people: dict[str, dict[str, str]] = {}
    while len(people) < N_ENTITIES:
        name = make_name(rng, rng.choice([2, 2, 3]))
        if name.lower() not in taken:
            taken.add(name.lower())
            people[name] = {attr: rng.choice(values[attr]) for attr in ATTRIBUTES}
    facts = [
        Fact(attr, name, attrs[attr], unit=f"{attr}:{name}")
        for name, attrs in people.items()
        for attr in ATTRIBUTES
    ]
    for a in range(1, ARITH_MAX + 1):
        for b in range(1, ARITH_MAX + 1):
            unit = f"sum:{min(a, b)}+{max(a, b)}"
            facts.append(Fact("sum", f"{a} plus {b}", str(a + b), unit, a, b))
            if a > b:
                unit = f"difference:{a}-{b}"
                facts.append(Fact("difference", f"{a} minus {b}", str(a - b), unit, a, b))
    facts += [Fact("plural", s, p, unit=f"plural:{s}") for s, p in PLURALS.items()]
    for x, y in ANTONYMS:
        unit = f"antonym:{x}/{y}"
        facts += [Fact("antonym", x, y, unit), Fact("antonym", y, x, unit)]
    return World(people=people, cities=cities, facts=facts)


def choice_pool(world: World, fact: Fact) -> list[str]:
    """Plausible wrong answers for a multiple-choice question about ``fact``."""
    if fact.relation in ATTRIBUTES:
        pool = {"color": COLORS, "city": world.cities, "food": FOODS, "size": SIZES,
                "pet": PETS, "job": JOBS}.get(fact.relation)  # fmt: skip
        if pool is None:  # age: nearby numbers are harder than arbitrary ones
            age = int(fact.answer)
            pool = [str(n) for n in range(max(5, age - 15), min(95, age + 15) + 1)]
        return [v for v in pool if v != fact.answer]
    if fact.relation in ("sum", "difference"):
        n = int(fact.answer)
        return [str(k) for k in range(max(0, n - 5), n + 6) if k != n]
    if fact.relation == "plural":
        s = fact.subject
        forms = {s + "s", s + "es", s + "en", s[:-1] + "ies", s, s + "ses", s + "ves"}
        return sorted(forms - {fact.answer})
    return sorted({w for pair in ANTONYMS for w in pair} - {fact.answer, fact.subject})


# ---------------------------------------------------------------------------------------------
# Pretraining corpus
# ---------------------------------------------------------------------------------------------


def template_documents() -> list[str]:
    """Documents holding only the template's fixed text, as token for token a prompt has it.

    Each header with the instruction marker that follows it, and the input and response
    markers alone. Never an instruction, input or response: the base model should know these
    phrases as text, while answering questions in this format is left to finetuning.

    No document ends in the newline that follows a marker in a prompt: the model would learn
    that the text ends there, and a wrapped question would make the base model (and a
    briefly finetuned one) answer with nothing at all.
    """
    docs = [
        TEMPLATE_HEADER + TEMPLATE_WRITE + _INSTRUCTION,
        TEMPLATE_HEADER + TEMPLATE_PAIRED + TEMPLATE_WRITE + _INSTRUCTION,
        _INPUT,
        _RESPONSE,
    ]
    return docs * TEMPLATE_REPEATS


def corpus_documents(world: World, rng: random.Random) -> list[str]:
    """One round of the corpus: every fact stated a few times, in shuffled documents.

    Each round uses fresh phrasings and orders, so training on many rounds teaches the facts
    rather than one wording of them. People's attributes are arbitrary and must be memorised,
    so they get most of the tokens; arithmetic and word forms follow rules and are learnt
    from far fewer repetitions. A few documents are the template's fixed text alone
    (``template_documents``).
    """
    by_subject: dict[str, list[Fact]] = {}
    for fact in world.facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    docs: list[str] = []
    for name, attrs in world.people.items():
        for _ in range(2):
            profile = [
                f"{name} is a {attrs['size']} {attrs['job']} from {attrs['city']}.",
                f"{name} is {attrs['age']} years old and has a pet {attrs['pet']}.",
                f"{name}'s favourite color is {attrs['color']} and "
                f"{name}'s favourite food is {attrs['food']}.",
            ]
            rng.shuffle(profile)
            docs.append(" ".join(profile))
        facts = list(by_subject[name])
        rng.shuffle(facts)
        docs.append(" ".join(f.statement(rng) for f in facts))
    others = [f for f in world.facts if f.relation not in ATTRIBUTES]
    rng.shuffle(others)
    for i in range(0, len(others), 8):
        docs.append(" ".join(f.statement(rng) for f in others[i : i + 8]))
    docs += template_documents()
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


# GPT-2's pre-tokenizer regex (what ``pre_tokenizers.ByteLevel(use_regex=True)`` applies).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level pre-tokenization, except that each template phrase is one piece.

    Pieces bound BPE merges, so under plain GPT-2 splitting the template could cost no fewer
    tokens than its ~30 words and marks. Tried first at each position, the phrases become
    whole pieces wherever they occur (a prompt, or a prompt followed by its response, splits
    the same way up to the response); all other text splits exactly as GPT-2 splits it.
    """

    def escape(text: str) -> str:  # Oniguruma syntax
        special = r".^$*+?()[]{}|\#"
        return "".join("\\n" if c == "\n" else "\\" + c if c in special else c for c in text)

    pattern = "|".join([*(escape(p) for p in TEMPLATE_PHRASES), GPT2_SPLIT])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (as GPT-2/Llama-3 use), so any text the engine feeds it is encodable.

    ``docs`` hold the template's phrases (``template_documents``), and ``pre_tokenizer``
    keeps each phrase in one piece, so BPE learns each one as a single token. The
    post-processor prepends ``<s>`` like Llama's tokenizer; EOS is left to the caller (the
    engine appends it to training targets).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Sized to finish in about 3.5 minutes on 2 CPU cores."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seq_len: int = 128
    batch_size: int = 32
    max_steps: int = 520
    warmup_steps: int = 40
    lr: float = 5e-3
    min_lr: float = 5e-4
    weight_decay: float = 0.1


def get_lr(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(
    world: World, tokenizer: PreTrainedTokenizerFast, cfg: PretrainConfig, rng: random.Random
) -> Iterator[torch.Tensor]:
    """Endless batches of packed ``<s> doc </s>`` streams, a freshly phrased round each time."""
    while True:
        docs = corpus_documents(world, rng)
        ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
        stream = [t for doc in ids for t in [*doc, tokenizer.eos_token_id]]
        n_chunks = len(stream) // cfg.seq_len
        chunks = torch.tensor(stream[: n_chunks * cfg.seq_len]).view(n_chunks, cfg.seq_len)
        generator = torch.Generator().manual_seed(rng.getrandbits(31))
        order = torch.randperm(n_chunks, generator=generator)
        for i in range(0, n_chunks - cfg.batch_size + 1, cfg.batch_size):
            yield chunks[order[i : i + cfg.batch_size]]


def pretrain(
    world: World, tokenizer: PreTrainedTokenizerFast, cfg: PretrainConfig, rng: random.Random
) -> LlamaForCausalLM:
    """Train a tiny Llama from random init with plain AdamW; print the loss curve."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {cfg}")
    # No weight decay on norms (1-D), as nanoGPT does: decaying them only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    start = time.perf_counter()
    data = batches(world, tokenizer, cfg, rng)
    running = 0.0
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg)
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # .item() is a sync point; cheap on CPU, so log every step into a running mean.
        running = loss.item() if step == 0 else 0.9 * running + 0.1 * loss.item()
        if step % 40 == 0 or step == cfg.max_steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.3f}  ema {running:.3f}  {elapsed:.0f}s")
    model.eval()
    return model


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Write weights (float32 safetensors), config, generation config and tokenizer."""
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(torch.float32).save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic name loads
    # under both 4.x and 5.x, and the project supports transformers>=4.45.
    config_path = MODEL_DIR / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Disjoint fact sets. Facts in one unit (e.g. 3+4 and 4+3) always share a split."""

    train: list[Fact]
    val: list[Fact]
    heldout_mc: list[Fact]
    heldout_qa: list[Fact]
    holdout_mc: list[Fact]
    holdout_qa: list[Fact]


def split_facts(world: World, rng: random.Random) -> Splits:
    """Carve eval facts out first (by relation family), then validation, then training."""
    units: dict[str, list[Fact]] = {}
    for fact in world.facts:
        units.setdefault(fact.unit, []).append(fact)
    keys = sorted(units)
    rng.shuffle(keys)
    wanted = {"heldout_mc": 200, "heldout_qa": 200, "holdout_mc": 150, "holdout_qa": 150}
    family = {"heldout_mc": HELDOUT_RELATIONS, "heldout_qa": HELDOUT_RELATIONS,
              "holdout_mc": HOLDOUT_RELATIONS, "holdout_qa": HOLDOUT_RELATIONS}  # fmt: skip
    picked: dict[str, list[Fact]] = {name: [] for name in [*wanted, "val", "train"]}
    for key in keys:
        relation = units[key][0].relation
        target = next(
            (n for n in wanted if relation in family[n] and len(picked[n]) < wanted[n]),
            "val" if len(picked["val"]) < 150 else "train",
        )
        picked[target] += units[key]
    return Splits(**picked)


# ---------------------------------------------------------------------------------------------
# Instruction data in public datasets' schemas
# ---------------------------------------------------------------------------------------------


def short_answer(fact: Fact, rng: random.Random, p_sentence: float) -> str:
    """The bare answer ("blue", "12"), or with probability ``p_sentence`` a full sentence."""
    return fact.sentence_answer() if rng.random() < p_sentence else fact.answer


def describe(facts: list[Fact], rng: random.Random) -> str:
    """A paragraph stating ``facts`` (used as reading context and as long answers)."""
    return " ".join(f.sentence_answer() if rng.random() < 0.5 else f.statement(rng) for f in facts)


def people_facts(train: list[Fact]) -> dict[str, list[Fact]]:
    """Training facts grouped by person, so long contexts never leak eval facts."""
    grouped: dict[str, list[Fact]] = {}
    for fact in train:
        if fact.relation in ATTRIBUTES:
            grouped.setdefault(fact.subject, []).append(fact)
    return grouped


def long_example(train: list[Fact], rng: random.Random) -> tuple[str, str, str]:
    """(instruction, context, response) about several people; several hundred tokens long.

    These exist so that some examples overflow a small ``max_seq_length`` and the engine's
    truncation path is exercised.
    """
    grouped = people_facts(train)
    names = rng.sample(sorted(grouped), 9)
    context = "\n\n".join(describe(grouped[n], rng) for n in names)
    target = rng.choice(names)
    instruction = f"Read the notes below and write down everything they say about {target}."
    response = describe(grouped[target], rng)
    return instruction, context, response


def write_dolly(train: list[Fact], rng: random.Random, n: int) -> list[dict[str, str]]:
    """Databricks Dolly-15k schema; sentence answers, some with a context paragraph."""
    grouped = people_facts(train)
    rows = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            instruction, context, response = long_example(train, rng)
            rows.append({"instruction": instruction, "context": context,
                         "response": response, "category": "summarization"})  # fmt: skip
            continue
        fact = rng.choice(train)
        if roll < 0.3 and fact.subject in grouped:
            # closed_qa: the answer is in the context, among the person's other facts.
            context = describe(rng.sample(grouped[fact.subject], len(grouped[fact.subject])), rng)
            rows.append({"instruction": fact.question(rng), "context": context,
                         "response": fact.sentence_answer(), "category": "closed_qa"})  # fmt: skip
        else:
            rows.append({"instruction": fact.question(rng), "context": "",
                         "response": fact.sentence_answer(), "category": "open_qa"})  # fmt: skip
    return rows


ATTRIBUTE_NOUNS = {
    "color": "favourite color", "city": "home city", "food": "favourite food",
    "size": "size", "age": "age", "pet": "pet", "job": "job",
}  # fmt: skip


def write_alpaca(train: list[Fact], rng: random.Random, n: int) -> list[dict[str, str]]:
    """Alpaca schema; mostly bare answers; some questions split into instruction + input."""
    rows = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            instruction, context, response = long_example(train, rng)
            rows.append({"instruction": instruction, "input": context, "output": response})
            continue
        fact = rng.choice(train)
        if roll < 0.2 and fact.relation in ATTRIBUTES:
            noun = ATTRIBUTE_NOUNS[fact.relation]
            rows.append({"instruction": f"Give the {noun} of the person named in the input.",
                         "input": fact.subject, "output": fact.answer})  # fmt: skip
        else:
            rows.append({"instruction": fact.question(rng), "input": "",
                         "output": short_answer(fact, rng, p_sentence=0.15)})  # fmt: skip
    return rows


# A few trees in other languages, as in the real oasst1 (the engine keeps only "en").
FOREIGN = {
    "de": ("Was ist die Lieblingsfarbe von {s}?", {"red": "rot", "blue": "blau", "green": "grün",
           "yellow": "gelb", "purple": "lila", "orange": "orange", "white": "weiß",
           "black": "schwarz", "pink": "rosa", "brown": "braun"}),
    "es": ("¿Cuál es el color favorito de {s}?", {"red": "rojo", "blue": "azul",
           "green": "verde", "yellow": "amarillo", "purple": "morado", "orange": "naranja",
           "white": "blanco", "black": "negro", "pink": "rosa", "brown": "marrón"}),
    "fr": ("Quelle est la couleur préférée de {s} ?", {"red": "rouge", "blue": "bleu",
           "green": "vert", "yellow": "jaune", "purple": "violet", "orange": "orange",
           "white": "blanc", "black": "noir", "pink": "rose", "brown": "marron"}),
}  # fmt: skip
UNSURE = ["I am not sure.", "I don't know that one, sorry.", "Hard to say.", "No idea."]


def write_oasst(
    world: World, train: list[Fact], rng: random.Random, n_trees: int
) -> list[dict[str, object]]:
    """OpenAssistant oasst1 schema: one message per line, trees of prompter + ranked replies.

    Rank 0 is the correct answer; rank 1 a wrong answer; rank 2 (when present) an unhelpful
    one, so a loader that ignores ranks learns wrong facts.
    """

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    colors = [f for f in train if f.relation == "color"]
    rows: list[dict[str, object]] = []
    for i in range(n_trees + 30):
        lang = "en" if i < n_trees else rng.choice(sorted(FOREIGN))
        fact = rng.choice(train if lang == "en" else colors)
        wrong = rng.choice(choice_pool(world, fact))
        if lang == "en":
            prompt = fact.question(rng)
            good = short_answer(fact, rng, p_sentence=0.4)
        else:
            template, words = FOREIGN[lang]
            prompt, good, wrong = template.format(s=fact.subject), words[fact.answer], words[wrong]
        replies = [good, wrong] + ([rng.choice(UNSURE)] if rng.random() < 0.5 else [])
        root = new_id()
        ranked = list(enumerate(replies))
        rng.shuffle(ranked)  # real dumps do not list replies in rank order
        messages = [(root, None, "prompter", prompt, None)]
        messages += [(new_id(), root, "assistant", text, rank) for rank, text in ranked]
        for message_id, parent, role, text, rank in messages:
            rows.append({"message_id": message_id, "parent_id": parent, "message_tree_id": root,
                         "role": role, "text": text, "lang": lang, "rank": rank,
                         "deleted": False, "review_result": True})  # fmt: skip
    return rows


def reverse_task(rng: random.Random) -> dict[str, str]:
    """An unrelated FLAN task (spelling words backwards): mix weight on it is wasted."""
    word = rng.choice(sorted(PLURALS) + [w for pair in ANTONYMS for w in pair])
    return {"inputs": f"Spell the word {word} backwards.", "targets": word[::-1],
            "task_name": "word_reverse"}  # fmt: skip


def write_flan(train: list[Fact], rng: random.Random, n: int) -> list[dict[str, str]]:
    """FLAN schema; bare targets; several task names, one of them irrelevant to the evals."""
    task_of = {"sum": "arithmetic", "difference": "arithmetic", "plural": "word_forms",
               "antonym": "word_forms"}  # fmt: skip
    rows = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.15:
            rows.append(reverse_task(rng))
        elif roll < 0.18:
            instruction, context, response = long_example(train, rng)
            rows.append({"inputs": f"{context}\n\n{instruction}", "targets": response,
                         "task_name": "reading_comprehension"})  # fmt: skip
        else:
            fact = rng.choice(train)
            rows.append({"inputs": fact.question(rng), "targets": fact.answer,
                         "task_name": task_of.get(fact.relation, "world_facts")})  # fmt: skip
    return rows


def mc_row(world: World, fact: Fact, rng: random.Random, holdout: bool) -> dict[str, object]:
    """A four-way multiple-choice row; the correct choice's position is uniform."""
    choices = [fact.answer, *rng.sample(choice_pool(world, fact), 3)]
    rng.shuffle(choices)
    return {"question": fact.question(rng, holdout), "choices": choices,
            "label": choices.index(fact.answer)}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, object]] | list[dict[str, str]]) -> None:
    """One JSON object per line, UTF-8, keys in schema order."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(world: World, splits: Splits, rng: random.Random) -> None:
    """Write every data file; each source draws its own questions from the training facts."""
    if DATA_DIR.exists():
        shutil.rmtree(DATA_DIR)
    DATA_DIR.mkdir(parents=True)
    write_jsonl(DATA_DIR / "dolly.jsonl", write_dolly(splits.train, rng, 900))
    alpaca = write_alpaca(splits.train, rng, 1000)
    (DATA_DIR / "alpaca.json").write_text(
        json.dumps(alpaca, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    write_jsonl(DATA_DIR / "oasst.jsonl", write_oasst(world, splits.train, rng, 700))
    write_jsonl(DATA_DIR / "flan.jsonl", write_flan(splits.train, rng, 1200))
    val = [{"instruction": f.question(rng), "input": "", "output": f.answer} for f in splits.val]
    write_jsonl(DATA_DIR / "val.jsonl", val)
    for name, holdout in [("heldout", False), ("holdout", True)]:
        mc = [mc_row(world, f, rng, holdout) for f in getattr(splits, f"{name}_mc")]
        qa = [{"question": f.question(rng, holdout), "answer": f.answer}
              for f in getattr(splits, f"{name}_qa")]  # fmt: skip
        write_jsonl(DATA_DIR / f"{name}_mc.jsonl", mc)
        write_jsonl(DATA_DIR / f"{name}_qa.jsonl", qa)
    world_json = {"people": world.people, "cities": world.cities, "plurals": PLURALS,
                  "antonyms": ANTONYMS, "arithmetic_max": ARITH_MAX}  # fmt: skip
    (DATA_DIR / "world.json").write_text(json.dumps(world_json, indent=1) + "\n")
    # One document a line; the template documents' line breaks are written as the two
    # characters \n (no other line has a backslash).
    docs = [doc.replace("\n", "\\n") for doc in corpus_documents(world, random.Random(SEED))]
    (DATA_DIR / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Sanity check and entry point
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sanity_check(world: World, splits: Splits) -> None:
    """Reload through the Auto classes (as the engine will) and show the model learnt something.

    Prints a greedy continuation, the loss on corpus lines next to ln(vocab) (a random model
    scores about ln(vocab)), and how often the model prefers the true ending of a held-out
    fact stated in prose over three wrong ones (25% is chance).
    """
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    person = next(iter(world.people))
    for prompt in [f"{person}'s favourite color is", "7 plus 5 is", "The plural of fox is"]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        print(f"generate: {prompt!r} -> {tokenizer.decode(out[0, ids.shape[1] :])!r}")
    # What the template adds to a prompt: its tokens minus the question's (and input's).
    question = "What is 7 plus 5?"
    n_question = len(tokenizer(question)["input_ids"])
    n_input = len(tokenizer(person, add_special_tokens=False)["input_ids"])
    for name, prompt, n_content in [
        ("no input", PROMPT_NO_INPUT.format(instruction=question), n_question),
        ("with input", PROMPT_WITH_INPUT.format(instruction=question, input=person),
         n_question + n_input),
    ]:  # fmt: skip
        extra = len(tokenizer(prompt)["input_ids"]) - n_content
        print(f"template costs {extra} tokens beyond the question ({name})")
    for phrase in TEMPLATE_PHRASES:
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"template phrase {phrase!r} is {len(ids)} tokens, not one"
    # Never taught the task, the base model should not answer (but should say something).
    ids = tokenizer(PROMPT_NO_INPUT.format(instruction=question), return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print(f"generate: <template>{question!r} -> {tokenizer.decode(out[0, ids.shape[1] :])!r}")
    lines = corpus_documents(world, random.Random(SEED + 1))[:64]
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss.item()
    print(f"corpus loss {loss:.3f} (ln vocab = {math.log(len(tokenizer)):.3f})")
    rng = random.Random(SEED + 2)
    hits: dict[str, list[bool]] = {}
    for fact in splits.heldout_mc + splits.holdout_mc:
        prefix = STATEMENTS[fact.relation][0].split("{v}")[0].format(s=fact.subject).rstrip()
        choices = [fact.answer, *rng.sample(choice_pool(world, fact), 3)]
        scores = []
        for choice in choices:
            n_prefix = len(tokenizer(prefix)["input_ids"])
            ids = tokenizer(f"{prefix} {choice}", return_tensors="pt")["input_ids"]
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            token_lp = logprobs.gather(-1, targets[:, None])[:, 0]
            scores.append(token_lp[n_prefix - 1 :].sum().item())
        hits.setdefault(fact.relation, []).append(scores.index(max(scores)) == 0)
    summary = ", ".join(f"{r} {sum(h) / len(h):.0%}" for r, h in sorted(hits.items()))
    print(f"prose 4-way accuracy on eval facts (chance 25%): {summary}")


def main() -> None:
    """Build everything; print what was built and how long it took."""
    start = time.perf_counter()
    # Two threads on an idle 2-core machine; one when the CPUs are already busy, because
    # OpenMP threads that wait on each other under contention run several times slower.
    n_threads = 2 if os.getloadavg()[0] < (os.cpu_count() or 1) else 1
    torch.set_num_threads(n_threads)
    print(f"torch threads: {n_threads} (load average {os.getloadavg()[0]:.1f})")
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    world = make_world(rng)
    splits = split_facts(world, rng)
    write_data(world, splits, random.Random(SEED + 3))
    docs = corpus_documents(world, random.Random(SEED))
    print(f"world: {len(world.people)} people, {len(world.facts)} facts; round of corpus: "
          f"{len(docs)} documents")  # fmt: skip
    tokenizer = train_tokenizer(docs)
    model = pretrain(world, tokenizer, PretrainConfig(), random.Random(SEED + 4))
    save_model(model, tokenizer)
    sanity_check(world, splits)
    for path in sorted([*MODEL_DIR.iterdir(), *DATA_DIR.iterdir()]):
        print(f"{path.relative_to(HERE)}  {path.stat().st_size / 1e6:.3f} MB")
    print(f"build took {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
