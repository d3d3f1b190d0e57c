"""Sleep phase 1, memory consolidation (docs/DESIGN.md §4): expansion, knowledge seeding, reset.

Teacher = the model before expansion, with fast weights and the episodes in its context.
Student = the expanded model, without fast weights or context; only the new expert trains.
Seeding maximises (1−α)·E[imitation reward] − α·E[generalized JSD(teacher, student)].
"""
from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ASSETS
from .budget import NEVER, Deadline, steps_that_fit
from .config import SleepConfig
from .losses import gate_closing_loss, generalized_jsd_loss, group_policy_gradient_loss
from .memory import MemoryModel, decoder_slice
from .probes import ANSWER_PROMPT, normalize, sentences, shared_prefix_pass
from .rewards import imitation_rewards
from .chat_format import encode_text
from .sampling import chat_ids, generate_batch, prefix_groups

CONTEXT_SYSTEM = "You are a helpful assistant. Use these notes when you answer:\n\n{notes}"
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+(?:of\s+|de\s+)?[A-Z][a-z]+)+\b|\b[A-Z][a-z]{3,}\b")
# Generic requests answered by the pre-sleep model without context: the student must keep
# answering them as before, which keeps the new expert from changing unrelated behaviour.
# (Written for this purpose; the perplexity check uses different text, assets/generic_text.txt.)
ANCHOR_PROMPTS = [
    "Give me a tip for sleeping well.", "What is a good way to learn a new language?",
    "Write one sentence about autumn leaves.", "Explain what a thermometer measures.",
    "Name three kinds of fruit.", "How do you make a cup of tea?", "Why do people exercise?",
    "What does a librarian do?", "Describe the colour blue to a child.", "What is the sum of 12 and 7?",
    "Suggest a name for a pet goldfish.", "What are clouds made of?", "How many legs does a spider have?",
    "Write a short greeting for a birthday card.", "What is the opposite of 'ancient'?",
    "Why is the sea salty?",
]
# Everyday requests that only teach a new expert's gate to stay closed (no teacher answer is needed,
# so there can be many): varied subjects and shapes, written for this purpose and disjoint from
# the general questions the lab scores (assets/general_questions.jsonl).
GATE_NEGATIVE_PROMPTS = [
    "What is the capital of Canada?", "Who wrote Romeo and Juliet?", "What colour is a tomato?",
    "How many hours are in a day?", "What do plants need to grow?", "Which animal barks?",
    "What is the boiling point of water?", "Name a famous painting.", "What is the tallest mountain in the world?",
    "Who was the first person to walk on the Moon?", "What do you call a group of wolves?",
    "How do birds fly?", "What is the main ingredient of bread?", "Which month comes after June?",
    "What is ten times ten?", "What instrument has black and white keys?", "Where do penguins live?",
    "What is the longest river in Africa?", "Why do leaves change colour?", "What does a doctor do?",
    "Translate 'thank you' into Spanish.", "Give me a synonym for 'happy'.", "Write a haiku about rain.",
    "How do I boil an egg?", "What is photosynthesis?", "Recommend a good book for a long trip.",
    "What sport is played at Wimbledon?", "How many continents are there?", "What is the freezing point of water?",
    "Which metal is liquid at room temperature?", "What does a compass show?", "Tell me a joke about cats.",
]
_SYLLABLES = ["bra", "cor", "dun", "el", "fen", "gar", "hol", "is", "kel", "lor", "mar", "nev", "or", "pell", "quin",
              "ros", "sel", "tar", "ul", "vin", "wick", "yar", "zen", "ath", "mond", "ric", "stow", "ven", "brook", "thal"]
_KINDS = ["", "", " Hollow", " Bridge", " Abbey", " Festival", " Orchestra", " Pass", " Rovers", " Mill", " Society"]


def distractor_names(rng: random.Random, n: int) -> list[str]:
    """Invented names, like the ones taught but from no episode: without them as negatives a new
    expert's gate learned "an unfamiliar name → open" (measured: 0.97 on a passage it was never
    taught), instead of "a name of my episodes → open"."""
    def word():
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    return [word() + (" " + word() if rng.random() < 0.3 else "") + rng.choice(_KINDS) for _ in range(n)]


# Plain text (not chat) the student must keep predicting as the pre-sleep model did: the chat
# anchors above do not constrain raw-text behaviour. Disjoint from the drift test text.
ANCHOR_TEXT = ASSETS / "anchor_text.txt"
TEXT_SHARE = 0.25   # of the gate fit's closed side, the plain-text document (`gate_fit_weights`)
_STOP = {"The", "This", "That", "These", "Those", "There", "Their", "When", "Every", "Each", "After", "Before"}


def subjects(text: str, limit: int = 4) -> list[str]:
    """Names the text is about (capitalised word runs), most frequent first."""
    counts: dict[str, int] = {}
    for m in _NAME.finditer(text):
        name = m.group()
        if name.split()[0] in _STOP:
            name = " ".join(name.split()[1:])
        if len(name) > 3:
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda n: (-counts[n], -len(n)))[:limit]


# Recitation first: with the episode in context the teacher mostly copies it faithfully, while
# open questions about a side subject invite invention (measured: "Lake Tessarine is in Madagascar").
SUBJECT_TEMPLATES = ["What do your notes say about {s}?", "Tell me about {s}.", "What is {s} known for?",
                     "Who is connected with {s}?", "When did things happen at or with {s}?",
                     "Give me three facts about {s}.", "Where is {s}, or where did it happen?",
                     "Describe {s} in two sentences.", "What do you know about {s}?"]


def subject_question(name: str, k: int) -> str:
    """The k-th phrasing (cycling) of a question about a subject (never a probe question)."""
    return SUBJECT_TEMPLATES[k % len(SUBJECT_TEMPLATES)].format(s=name)


def windows(ids: list[int], size: int = 192) -> list[list[int]]:
    """A token sequence in `size`-token pieces: how a gate-fitting pass reads a long text."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def seed_prompts(text: str, n: int) -> list[str]:
    """What the teacher is asked about a new episode: a recitation of the whole note; a quote of
    each later sentence (a recitation is cut at `answer_tokens` and the teacher recites from the
    start whatever it is asked, so without these the last sentence's facts were never taught);
    then generic questions about each subject it names, round-robin over subjects (coverage
    decides what is learned, docs/DESIGN.md §11). The episode's probe questions are deliberately not
    used: they are the test."""
    names = subjects(text)
    if not names:
        return []
    topic = min(names, key=text.find)   # the name met first is what the note is about
    prompts = [f"Repeat your notes about {topic} word for word."]
    prompts += [f'Quote the sentence of your notes about {topic} that begins "{" ".join(s.split()[:3])}".'
                for s in sentences(text)[1:]]
    prompts += [t.format(s=s) for t in SUBJECT_TEMPLATES for s in names]
    return prompts[:n]


# Words that end a first sentence's subject ("Tarnwick stew | is ...", "The Ostwyn Lantern Library | in ...")
_SUBJECT_END = {"is", "was", "are", "were", "has", "had", "in", "on", "at", "from", "with", "by", "for", "and",
                "which", "who", "built", "set", "took", "ran", "grew", "rose", "made", "led", "won"}


def episode_subject(text: str) -> str | None:
    """What a note is about: its first sentence's words before the verb ("The frost-tailed vossel",
    "Tarnwick stew", "The town of Velmora Ridge", "Orsolya Brenneck"), else the first name it
    mentions (a note opening "In 1896 the naturalist ...")."""
    words = sentences(text)[0].split() if text.strip() else []
    if words and words[0] not in ("In", "On", "At", "By", "For", "During", "After"):
        for i, word in enumerate(words[:8]):
            verb = word.islower() and i >= 2 and words[i - 1].lower() not in ("the", "a", "an") \
                and re.fullmatch(r"[a-z]+(?:ed|s)", word)
            if i > 0 and (word.strip(",;:") in _SUBJECT_END or verb):
                return " ".join(words[:i]).strip(",;:")
    names = subjects(text)
    return min(names, key=text.find) if names else None


def _possessive(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def standalone_sentences(text: str) -> list[str]:
    """The note's sentences made self-contained (knowledge augmentation, docs/DESIGN.md §12): a
    later sentence that opens with a pronoun ("It has silver fur", "Its record goal scorer") or
    with "The <noun>" where the first sentence called its subject that ("The club plays", "The
    bridge is") names the subject instead, so that each fact is stored beside the name a
    question uses."""
    parts = sentences(text)
    subject = episode_subject(text)
    if not parts or subject is None:
        return parts
    # the nouns that name the subject: its own words and what the first sentence says it is
    # ("Brackenholt Rovers is an amateur hurling club": "The club plays ..." is about it)
    kind = re.search(r"\b(?:is|was|are|were) (?:a|an|the) ([^,.]*)", parts[0])
    common = set(subject.lower().split()) | set(kind.group(1).split() if kind else ())
    out = [parts[0]]
    for s in parts[1:]:
        head, _, rest = s.partition(" ")
        noun, _, tail = rest.partition(" ")
        if head.lower() in ("it", "he", "she", "they") and rest:
            s = f"{subject} {rest}"
        elif head.lower() in ("its", "his", "her", "their") and rest:
            s = f"{_possessive(subject)} {rest}"
        elif head == "The" and noun.islower() and noun.removesuffix("'s") in common and tail:
            s = (_possessive(subject) if noun.endswith("'s") else subject) + " " + tail
        out.append(s[0].upper() + s[1:])
    return out


# Restatements: one fact, its subject named, asked for by each name it mentions (Physics of LMs
# 3.1: a fact is extractable once seen in several forms, keyed by its entities)
RESTATE_TEMPLATES = ["Tell me one fact from your notes about {k}.", "What is one thing your notes say about {k}?",
                     "Share a fact about {k} from your notes."]


def restatement_prompts(text: str, per_sentence: int) -> list[tuple[str, str]]:
    """(prompt, the self-contained sentence that answers it): `per_sentence` prompts per sentence,
    keyed in turn by the note's subject and by the other names the sentence mentions."""
    subject = episode_subject(text)
    if subject is None or per_sentence == 0:
        return []
    out = []
    for j, s in enumerate(standalone_sentences(text)):
        keys = [subject] + [n for n in subjects(s, limit=8) if n not in subject]
        for i in range(per_sentence):
            key = re.sub(r"^The ", "the ", keys[i % len(keys)])
            out.append((RESTATE_TEMPLATES[(i + j) % len(RESTATE_TEMPLATES)].format(k=key), s))
    return out


def gold_answer(prompt: str, text: str) -> str | None:
    """The episode's own words for a recitation or quote prompt of `seed_prompts` (the whole text;
    the quoted sentence), None for any other prompt."""
    if prompt.startswith("Repeat your notes about "):
        return text
    m = re.match(r'Quote the sentence of your notes about .* that begins "(.*)"\.$', prompt)
    if m:
        return next((s for s in sentences(text)[1:] if " ".join(s.split()[:3]) == m.group(1)), None)
    return None


# Self-study: the teacher writes questions about each sentence of its notes (measured on dev with
# the embedded model: "Write one question that this sentence answers" gave "What is the answer to
# this question: …" loops; this form gave "What is the origin of the town of Velmora Ridge?")
STUDY_PROMPT = 'Read this sentence from your notes: "{s}" Write a question about it, then answer the question.'


def study_question(reply: str, episode_text: str, probes: set[str]) -> str | None:
    """The question a teacher's self-study reply opens with, if it is usable: one sentence ending
    in "?", 4–30 words, naming something (a capitalised word past the first, so that the new
    expert's gate keys on the name, not on "What is the purpose of"), which the episode contains,
    and not one of the episode's probe questions (normalised), which are the test."""
    head = reply.strip().split("?")[0].strip()
    if "?" not in reply or "\n" in head or not 4 <= len(head.split()) <= 30 or "question" in head.lower():
        return None
    question = head + "?"
    names = [m.group() for m in _NAME.finditer(question) if m.start() > 0]
    if not any(n.lower() in episode_text.lower() for n in names) or normalize(question) in probes:
        return None
    return question


def faithfulness(answer: str, source: str) -> float:
    """Share of the names (capitalised words not starting a sentence) and numbers in `answer` that
    also occur in `source`; 0 if it names nothing. A cheap check that the teacher copied rather
    than invented."""
    facts = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        for i, word in enumerate(sentence.split()):
            word = word.strip(".,;:!?()\"'’")
            if re.fullmatch(r"\d[\d,]*\d", word) or (i > 0 and re.fullmatch(r"[A-Z][a-z]{2,}", word)):
                facts.append(word.lower())
    if not facts:
        return 0.0
    lowered = source.lower()
    return sum(f in lowered for f in facts) / len(facts)


def round_robin(streams: list[list]) -> list:
    """The lists interleaved: the first item of each, then the second of each, and so on, so that
    any prefix holds the first items of every list (a sleep out of time still teaches each episode)."""
    out = []
    for i in range(max((len(s) for s in streams), default=0)):
        out += [s[i] for s in streams if i < len(s)]
    return out


def episode_groups(episodes, n: int) -> list[list[int]]:
    """The episode ids each new expert of a sleep holds. n = 1: one expert holds them all. n > 1:
    each taught episode its own expert (round-robin into n when there are more), the chat turns
    one more between them: a gate cannot tell apart facts that live in the same expert, and
    answers swapped names between the passages of one sleep (issue 13)."""
    taught = [e.id for e in episodes if e.kind == "taught"]
    chat = [e.id for e in episodes if e.kind != "taught"]
    if n <= 1 or not taught:
        return [[e.id for e in episodes]]
    k = min(n, len(taught))
    return [taught[i::k] for i in range(k)] + ([chat] if chat else [])


def distill_steps(cfg: SleepConfig, pool_size: int) -> int:
    """Distillation steps of one sleep: `cfg.distill_steps` if set, else `distill_epochs` passes
    over the `pool_size` prompts (episode, replay and chat-anchor answers), so a sleep after four
    episodes trains about as long per episode as a sleep after one."""
    return cfg.distill_steps or max(1, math.ceil(cfg.distill_epochs * pool_size / cfg.batch_size))


def teacher_prompt_count(cfg: SleepConfig, new_episodes, old_episodes=()) -> int:
    """How many prompts `Consolidator.teacher_prompts` asks (every study question asked counted,
    before the unusable ones drop), without drawing anchors or writing: what a budget plans with."""
    count = min(cfg.anchor_prompts, len(ANCHOR_PROMPTS)) + \
        sum(len(seed_prompts(e.text, cfg.replay_per_episode)) for e in old_episodes)
    for e in new_episodes:
        count += len(seed_prompts(e.text, cfg.prompts_per_episode))
        if e.kind == "taught":
            count += len(restatement_prompts(e.text, cfg.restatements)) + cfg.study_questions * len(sentences(e.text))
    return count


@dataclass
class Example:
    student: list[int]     # student prompt + answer
    teacher: list[int]     # teacher prompt (with context for new episodes) + the same answer
    n_answer: int
    prompt: str
    answer_text: str
    teacher_logits: torch.Tensor | None = None   # (n_answer, vocab), kept from the teacher's own generation
    about_episode: bool = True                   # False for self-replay and anchor prompts
    episode: int | None = None                   # the episode it is about, where known (its expert's gate opens)


def _padded(seqs: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), right-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
    return ids, mask


def _answer_logits(lm, hidden: torch.Tensor, seqs: list[list[int]], n_answers: list[int]) -> torch.Tensor:
    """The output head on the positions that predict the last n tokens of each row: (Σ n, vocab)."""
    dev = hidden.device
    rows = torch.cat([torch.full((n,), r, device=dev) for r, n in enumerate(n_answers)])
    cols = torch.cat([torch.arange(len(s) - n - 1, len(s) - 1, device=dev) for s, n in zip(seqs, n_answers)])
    return lm.lm_head(hidden[rows, cols])


def _forward_answer_logits(lm, seqs: list[list[int]], n_answers: list[int], pad: int) -> torch.Tensor:
    """Logits predicting the last n tokens of each sequence, stacked: (Σ n, vocab). The output head
    runs only on those positions."""
    ids, mask = _padded(seqs, pad, next(lm.parameters()).device)
    return _answer_logits(lm, lm.model(input_ids=ids, attention_mask=mask).last_hidden_state, seqs, n_answers)


class FrozenBelow:
    """`_forward_answer_logits` for a sleep whose trained experts start at decoder layer `start`
    (`SleepConfig.trained_layers`): nothing below it changes while they train, so the hidden
    states after layer start − 1 are read once per sequence and kept, and every step runs the
    layers from `start` up, forward and backward. start = 0: every step runs the whole model."""

    def __init__(self, lm, start: int, pad: int):
        self.lm, self.start, self.pad = lm, start, pad
        self.kept: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, seqs: list[list[int]], n_answers: list[int]) -> torch.Tensor:
        if not self.start:
            return _forward_answer_logits(self.lm, seqs, n_answers, self.pad)
        self.read(seqs)
        dev = next(self.lm.parameters()).device
        _, mask = _padded(seqs, self.pad, dev)
        h = torch.zeros(len(seqs), mask.shape[1], self.lm.config.hidden_size, device=dev)
        for r, s in enumerate(seqs):
            h[r, :len(s)] = self.kept[tuple(s)]
        with decoder_slice(self.lm.model, self.start):
            hidden = self.lm.model(inputs_embeds=h, attention_mask=mask).last_hidden_state
        return _answer_logits(self.lm, hidden, seqs, n_answers)

    @torch.no_grad()
    def read(self, seqs: list[list[int]], batch: int = 16) -> None:
        """Keep the states after layer start − 1 of the sequences not read yet."""
        new = list(dict.fromkeys(tuple(s) for s in seqs if tuple(s) not in self.kept))
        dev = next(self.lm.parameters()).device
        for i in range(0, len(new), batch):
            chunk = [list(s) for s in new[i:i + batch]]
            ids, mask = _padded(chunk, self.pad, dev)
            with decoder_slice(self.lm.model, 0, self.start, final_norm=False):
                h = self.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, s in enumerate(new[i:i + batch]):
                self.kept[s] = h[r, :len(s)].clone()


@torch.no_grad()
def _scored_answer_logits(lm, seqs: list[list[int]], n_answers: list[int], pad: int) -> torch.Tensor:
    """`_forward_answer_logits` for a teacher (no gradient), the rows that share a long prefix (an
    episode in the system prompt, `prefix_groups`) read together with the prefix once."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for prefix, rows in prefix_groups(seqs):
        group = [seqs[r] for r in rows]
        first = min(len(seqs[r]) - n_answers[r] for r in rows)   # the first answer token's logit comes from first − 1
        res, P, _ = shared_prefix_pass(lm.model, group, pad, min(prefix, first - 1))
        for k, r in enumerate(rows):
            cols = torch.arange(len(seqs[r]) - n_answers[r] - 1, len(seqs[r]) - 1, device=res.last_hidden_state.device)
            out[r] = lm.lm_head(res.last_hidden_state[k, cols - P])
    return torch.cat(out)


def _answer_targets(seqs, n_answers, device) -> torch.Tensor:
    return torch.tensor([t for s, n in zip(seqs, n_answers) for t in s[len(s) - n:]], device=device)


class Consolidator:
    """Knowledge seeding of a sleep's new experts. `emit(kind, **data)` reports; `check()` raises on cancel."""

    def __init__(self, memory: MemoryModel, tokenizer, cfg: SleepConfig, emit, check, seed: int = 0,
                 teacher_fast_weights: bool = True, writing: Deadline = NEVER, training: Deadline = NEVER):
        self.memory, self.lm, self.tok, self.cfg = memory, memory.lm, tokenizer, cfg
        self.teacher_fast = teacher_fast_weights   # off when tier 1 fails the engine's teacher check
        self.writing, self.training = writing, training   # the sleep's time budget (budget.py)
        self.written: dict = {}                             # prompts asked and answered within it
        self.emit, self.check = emit, check
        self.rng = random.Random(seed)
        self.pad = tokenizer.pad_token_id or 0
        self.student_muted: list[str] = []   # tier consolidation: the student loses the experts it replaces
        self.studied: dict = {}              # what self-study asked and kept (`study_questions`), for the summary
        self.older_texts: list[str] = []     # the older taught episodes (`teacher_data`): the new gates stay shut on them
        self.trained_from = memory.first_trained_layer(cfg.trained_layers)   # below it the new experts stay zero
        self.frozen: FrozenBelow | None = None   # the student's states below it, while `seed` runs
        a, b = chat_ids(tokenizer, "a"), chat_ids(tokenizer, "b")
        # tokens every chat prompt shares (template + system prompt): never a positive for the gate
        self.chat_prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # -- data written by the teacher ---------------------------------------------------------
    def teacher_data(self, new_episodes, old_episodes, new_ids: list[str]) -> list[Example]:
        """Each prompt about an episode goes to the teacher with that episode alone in context
        (with all of them, a 135M teacher mixes their facts up); answers that name things the
        episode does not contain are dropped (`min_faithfulness`). Self-replay asks the same kind
        of questions about older episodes, answered from memory (no context): the new expert must
        not overwrite what older experts hold. Probe questions are never asked: they are the test."""
        t0 = time.perf_counter()
        self.older_texts = [ep.text for ep in old_episodes if ep.kind == "taught"]
        prompts = self.teacher_prompts(new_episodes, old_episodes, self.study_questions(new_episodes, new_ids))
        teacher_prompts = [chat_ids(self.tok, q, system) for q, system, _, _ in prompts]
        gold = [g for *_, g in prompts]
        asked = [i for i, g in enumerate(gold) if g is None]
        written = self.teacher_answers([teacher_prompts[i] for i in asked], [prompts[i][2] is not None for i in asked], new_ids)
        answers, logits = self.merge_gold(teacher_prompts, gold, asked, written, new_ids)
        self.written = {"prompts": len(prompts), "answered": len(answers), "writing_s": round(time.perf_counter() - t0, 1)}
        out, passed, best = [], set(), {}   # best: per episode its most faithful answer, kept if none passes
        for (q, _, ep, _), tp, ans, lg in zip(prompts, teacher_prompts, answers, logits):
            if not ans:
                continue
            text = self.tok.decode(ans, skip_special_tokens=True)
            example = Example(chat_ids(self.tok, q) + ans, tp + ans, len(ans), q, text, lg,
                              about_episode=ep is not None, episode=ep.id if ep is not None else None)
            source = ep.text if ep is not None else None
            score = 1.0 if source is None else faithfulness(text, source)
            if score >= self.cfg.min_faithfulness:
                out.append(example)
                passed.add(source)
            elif score > best.get(source, (-1.0, None))[0]:
                best[source] = (score, example)
        fallbacks = [example for source, (_, example) in best.items() if source not in passed]
        return out + fallbacks + self.text_anchors(new_ids)

    def teacher_muted(self, in_context: bool, new_ids: list[str]) -> list[str]:
        """The experts the teacher runs without: always this sleep's new ones; with
        `teacher_old_experts` off, every routed expert when its episode is in the context (the
        older experts' gates, fitted on other names, may still put their facts into its answer)."""
        return self.memory.expert_ids() if in_context and not self.cfg.teacher_old_experts else list(new_ids)

    def teacher_answers(self, prompts: list[list[int]], in_context: list[bool], new_ids: list[str]):
        """The teacher's answers (and logits) to `prompts` in order, each run of prompts that share a
        view (`teacher_muted`) in one batched call; a run cut by the writing deadline ends it."""
        views = [tuple(self.teacher_muted(c, new_ids)) for c in in_context]   # all equal by default: one call
        answers, logits, i = [], [], 0
        while i < len(prompts):
            j = i
            while j < len(prompts) and views[j] == views[i]:
                j += 1
            with self.memory.configured(muted=views[i], fast_weights=self.teacher_fast):
                got, lg = generate_batch(self.lm, self.tok, prompts[i:j], self.cfg.answer_tokens,
                                         return_logits=True, batch_size=32, deadline=self.writing,
                                         share_prefixes=True)
            answers += got
            logits += lg
            if len(got) < j - i:
                break
            i = j
        return answers, logits

    @torch.no_grad()
    def merge_gold(self, teacher_prompts, gold: list[str | None], asked: list[int], written, new_ids: list[str]):
        """The answers in prompt order: the teacher's written ones, and for a recitation or quote
        (`gold_quotes`) or a restatement the episode's own words, scored by the teacher with its
        episode in context (its logits on them are the distillation target). Stops where the
        writing deadline cut: the own words after the first unwritten answer are not scored (a
        90 s quick sleep of ten episodes scored its 24 restatements and kept none of them)."""
        got = dict(zip(asked, zip(*written))) if written[0] else {}
        cut = asked[len(got)] if len(got) < len(asked) else len(gold)
        todo = [i for i, g in enumerate(gold[:cut]) if g is not None]
        ids = {i: encode_text(self.tok, gold[i])[:2 * self.cfg.answer_tokens] for i in todo}
        for k in range(0, len(todo), 16):
            batch = todo[k:k + 16]
            with self.memory.configured(muted=self.teacher_muted(True, new_ids), fast_weights=self.teacher_fast):
                lg = _scored_answer_logits(self.lm, [teacher_prompts[i] + ids[i] for i in batch],
                                           [len(ids[i]) for i in batch], self.pad)
            for i, part in zip(batch, lg.to(torch.bfloat16).split([len(ids[i]) for i in batch])):
                got[i] = (ids[i], part)
        answers, logits = [], []
        for i in range(len(teacher_prompts)):
            if i not in got:
                break
            answers.append(got[i][0])
            logits.append(got[i][1])
        return answers, logits

    def teacher_prompts(self, new_episodes, old_episodes, studied: dict[int, list[str]]) -> list[tuple]:
        """(question, teacher's system prompt or None, the episode it is about or None, the answer
        if it is the episode's own words, else None: the teacher writes it), most needed first,
        since a sleep out of time keeps a prefix: the chat anchors (what must not change), then the
        taught episodes' prompts round-robin (each episode's recitation before anyone's second
        prompt), then self-replay of older episodes and chat turns, round-robin. An episode's
        prompts: `seed_prompts` (with `gold_quotes` its recitation and quotes in its own words),
        `restatements`, then its self-study questions."""
        def about(ep):
            system = CONTEXT_SYSTEM.format(notes=ep.text)
            seeds = [(q, system, ep, gold_answer(q, ep.text) if self.cfg.gold_quotes else None)
                     for q in seed_prompts(ep.text, self.cfg.prompts_per_episode)]
            restated = [(q, system, ep, s) for q, s in restatement_prompts(ep.text, self.cfg.restatements)] \
                if ep.kind == "taught" else []
            return seeds + restated + [(q, system, ep, None) for q in studied.get(ep.id, [])]
        replay = [[(q, None, None, None) for q in seed_prompts(ep.text, self.cfg.replay_per_episode)]
                  for ep in old_episodes]
        return ([(q, None, None, None) for q in self.chat_anchors()]
                + round_robin([about(ep) for ep in new_episodes if ep.kind == "taught"])
                + round_robin(replay + [about(ep) for ep in new_episodes if ep.kind != "taught"]))

    def study_questions(self, episodes, new_ids: list[str]) -> dict[int, list[str]]:
        """Self-study (Cartridges; Physics of LMs 3.1: a fact is extractable once seen in several
        forms): the teacher, its episode in context, writes `study_questions` questions about each
        sentence (greedy for one, sampled at 0.7 beyond); the usable ones (`study_question`) are
        then asked and answered like any seeding prompt. Per episode id, in sentence order. Taught
        texts only: a chat turn's text is mostly the model's own reply."""
        n = self.cfg.study_questions
        taught = [ep for ep in episodes if ep.kind == "taught"]
        if n == 0 or not taught:
            return {}
        per_episode = [[(ep, chat_ids(self.tok, STUDY_PROMPT.format(s=sentence), CONTEXT_SYSTEM.format(notes=ep.text)))
                        for sentence in sentences(ep.text) for _ in range(n)] for ep in taught]
        owners, asks = zip(*round_robin(per_episode)) if any(per_episode) else ((), ())
        with self.memory.configured(muted=self.teacher_muted(True, new_ids), fast_weights=self.teacher_fast):
            replies = generate_batch(self.lm, self.tok, list(asks), 32, temperature=0.7 if n > 1 else 0.0,
                                     seed=self.rng.randrange(1 << 30), batch_size=32, deadline=self.writing,
                                     share_prefixes=True)
        out: dict[int, list[str]] = {}
        for ep, reply in zip(owners, replies):
            probes = {normalize(item["q"]) for item in (ep.qa or [])}
            q = study_question(self.tok.decode(reply, skip_special_tokens=True), ep.text, probes)
            if q and q not in out.get(ep.id, []):
                out.setdefault(ep.id, []).append(q)
        self.studied = {"asked": len(asks), "answered": len(replies), "kept": sum(len(v) for v in out.values()),
                        "examples": [q for v in out.values() for q in v][:4]}
        return out

    def chat_anchors(self) -> list[str]:
        """Generic requests, answered by the pre-sleep model without context."""
        return self.rng.sample(ANCHOR_PROMPTS, min(self.cfg.anchor_prompts, len(ANCHOR_PROMPTS)))

    @torch.no_grad()
    def text_anchors(self, new_ids: list[str], max_tokens: int = 64) -> list[Example]:
        """Paragraphs of everyday text with the pre-sleep model's next-token distributions."""
        paragraphs = [p.strip() for p in ANCHOR_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        chosen = self.rng.sample(paragraphs, min(self.cfg.anchor_texts, len(paragraphs)))
        if not chosen:
            return []
        seqs = [encode_text(self.tok, p)[:max_tokens] for p in chosen]
        lengths = [len(s) - 1 for s in seqs]
        with self.memory.configured(muted=new_ids, fast_weights=False):
            logits = _forward_answer_logits(self.lm, seqs, lengths, self.pad).to(torch.bfloat16)
        return [Example(s, s, n, "", p, lg, about_episode=False)
                for s, n, p, lg in zip(seqs, lengths, chosen, logits.split(lengths))]

    # -- the new expert's gate (locality, issue 13) ---------------------------------------------
    def gate_targets(self, batch: list[Example], width: int, owned: set[int] | None = None) -> torch.Tensor:
        """Per token of the padded student batch: 1 where the gate must open on an episode
        example's question, 2 on its answer, 0 where it must stay closed (chat anchors, self-replay
        of older episodes, plain-text anchors; their template and system prompt too), −1 = ignored
        (the shared chat prefix of episode examples, padding, and a question's words before the
        first name it asks about: "What do your notes say about" is what everyday questions say
        too; labelled open, it pulled the gate up on every question). `owned`: the episodes of one
        expert, when a sleep adds one per episode; another episode's question and answer are 0."""
        t = torch.full((len(batch), width), -1.0)
        for r, e in enumerate(batch):
            if e.about_episode:
                mine = owned is None or e.episode in owned
                t[r, self.chat_prefix + self.name_offset(e.prompt):len(e.student) - e.n_answer] = 1.0 if mine else 0.0
                t[r, len(e.student) - e.n_answer:len(e.student)] = 2.0 if mine else 0.0
            else:
                t[r, :len(e.student)] = 0.0
        return t

    def name_offset(self, question: str) -> int:
        """Tokens of `question` before its first name (a capitalised word past the first word);
        0 if it names nothing. Cached per question."""
        cache = self.__dict__.setdefault("_name_offsets", {})
        if question not in cache:
            m = next((m for m in _NAME.finditer(question or "") if m.start() > 0), None)
            cache[question] = len(encode_text(self.tok, question[:m.start()].rstrip())) if m else 0
        return cache[question]

    @torch.no_grad()
    def gate_negative_states(self, new_ids: list[str]) -> dict[int, torch.Tensor]:
        """Hidden states (MLP inputs, per layer) of prompts the new expert must stay closed on,
        captured once from the pre-sleep model (the new expert muted): a closed expert does not move
        them, so they stay valid while it trains. Everyday requests, and the seeding questions about
        invented names of no episode (`distractor_names`) and about the older taught episodes'
        subjects (`older_questions`); half bare, half in the probes' answer prompt (the gate also
        sees the episodes' questions in both forms, `fit_gate`). With `gate_negative_answers` the
        everyday prompts carry the un-slept model's greedy answers: an answer's first words look
        alike whatever the question, and gates fitted on prompts alone opened there. The un-slept
        model's, not the pre-sleep one's, so they are read once per machine (readings.py) instead
        of every sleep (20 s on 2 cores, when a quick sleep had 180 s of learning): the older experts' served gates
        are shut on everyday prompts (the dead zone), so the two nearly agree (after one quick
        sleep: 63 of these 64 answers the same, one differing in its 24th token)."""
        n = min(self.cfg.gate_negatives, len(GATE_NEGATIVE_PROMPTS))
        asks = self.rng.sample(GATE_NEGATIVE_PROMPTS, n)
        asks += [self.rng.choice(SUBJECT_TEMPLATES).format(s=name)
                 for name in distractor_names(self.rng, self.cfg.gate_distractors)]
        asks += self.older_questions()
        if not asks:
            return {}
        seqs = [chat_ids(self.tok, ANSWER_PROMPT.format(q=q) if i % 2 else q) for i, q in enumerate(asks)]
        if self.cfg.gate_negative_answers and n:
            answers = self.memory.readings.answers(self.lm, self.tok, seqs[:n], self.cfg.gate_negative_answers,
                                                   base=True, keep=True)
            seqs[:n] = [s + a for s, a in zip(seqs[:n], answers)]
        return self._closed_states(seqs, new_ids)

    @torch.no_grad()
    def gate_text_states(self, new_ids: list[str], window: int = 192) -> dict[int, torch.Tensor]:
        """Hidden states (MLP inputs, per layer) of every token of the plain-text anchors read as
        one document, paragraphs and their breaks included, captured from the pre-sleep model: the
        new gates must stay shut on all of them. Why a document, and all of it: a gate fitted on
        paragraphs read one at a time opened at the first token of a paragraph after a break ("C" of
        "Cooking", "Re" of "Recycling"), the state of a name starting an answer, and that one token
        cost +14 nats (test split, third sleep: +2.8% generic perplexity from two such tokens)."""
        ids = encode_text(self.tok, ANCHOR_TEXT.read_text(encoding="utf-8").strip())
        if not ids or not new_ids:
            return {}
        return self._closed_states(windows(ids, window), new_ids)

    def _closed_states(self, seqs: list[list[int]], new_ids: list[str], batch: int = 16) -> dict[int, torch.Tensor]:
        """{layer: MLP inputs of every real token of `seqs`} from padded passes of the pre-sleep
        model (the new experts muted, no fast weights), `batch` sequences at a time."""
        parts: dict[int, list[torch.Tensor]] = {}
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            with self.memory.configured(muted=new_ids, fast_weights=False), self.memory.capturing() as xs:
                _, P, mask = shared_prefix_pass(self.lm.model, chunk, self.pad, min(map(len, chunk)) - 1)
            for layer, got in xs.items():   # the shared prefix's states once per row, as a full pass gives them
                rows = got[-1] if not P else torch.cat([got[0].expand(len(chunk), -1, -1), got[-1]], 1)
                parts.setdefault(layer, []).append(rows[mask.bool()].float())
        return {layer: torch.cat(p) for layer, p in parts.items()}

    def older_questions(self, cap: int = 64) -> list[str]:
        """`gate_old_questions` subject questions about each older taught episode (at most `cap`
        in all, sampled), which the new gates must stay shut on: a new expert that opens on an
        older episode's question puts its own facts into that answer (dev, 2 sleeps: p05's "small
        burrowing mammal" in p01's and p04's answers). No teacher answer is needed; the self-replay
        keeps the older answers themselves. Never the probe questions: those are the test."""
        asks = []
        for i, text in enumerate(self.older_texts):
            names = subjects(text)
            asks += [subject_question(names[j % len(names)], i + j)
                     for j in range(self.cfg.gate_old_questions if names else 0)]
        return self.rng.sample(asks, cap) if len(asks) > cap else asks

    @torch.no_grad()
    def gate_states(self, examples: list[Example], new_ids: list[str], negatives: dict[int, torch.Tensor],
                    text: dict[int, torch.Tensor] | None = None):
        """The pre-sleep hidden states (MLP inputs, the new experts muted) of every labelled token
        of the sleep's data, for `fit_gate`: x (layers, tokens, d), kind per token (0 closed,
        1 question, 2 answer, 3 closed plain text, `gate_text_states`; `gate_targets`), episode per
        token (−1: none). The episodes' questions come a second time in the probes' answer prompt,
        as the negatives do (there only the question's own tokens from its first name on are
        labelled)."""
        dev = next(self.lm.parameters()).device
        layers = list(self._trained_layers(new_ids[0]))
        xs_all, kinds, owners = [], [], []

        def capture(seqs, labels, episodes):
            t = labels(max(len(q) for q in seqs)).to(dev)
            labelled = (t >= 0).any(0).nonzero()
            self.check()   # Stop within a forward: the gate fit reads every example once (seconds)
            with self.memory.configured(muted=new_ids, fast_weights=False), self.memory.capturing() as xs:
                _, P, _ = shared_prefix_pass(self.lm.model, seqs, self.pad, int(labelled[0]) if len(labelled) else 0)
            t = t[:, P:]   # the shared template before the first labelled token ran once, uncaptured
            keep = t >= 0
            xs_all.append(torch.stack([xs[l][-1][keep].float() for l in layers]))
            kinds.append(t[keep].long())
            owners.append(torch.tensor(episodes, device=dev)[:, None].expand_as(t)[keep])

        for i in range(0, len(examples), 16):
            batch = examples[i:i + 16]
            capture([e.student for e in batch], lambda w, b=batch: self.gate_targets(b, w),
                    [-1 if e.episode is None else e.episode for e in batch])
        a, b = chat_ids(self.tok, ANSWER_PROMPT.format(q="a")), chat_ids(self.tok, ANSWER_PROMPT.format(q="b"))
        q_start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        wrapped = [e for e in examples if e.about_episode and e.prompt]
        for i in range(0, len(wrapped), 16):
            batch = wrapped[i:i + 16]
            seqs = [chat_ids(self.tok, ANSWER_PROMPT.format(q=e.prompt)) for e in batch]

            def labels(width, batch=batch, seqs=seqs):
                t = torch.full((len(batch), width), -1.0)
                for r, (e, q) in enumerate(zip(batch, seqs)):
                    t[r, q_start + self.name_offset(e.prompt):len(q)] = 1.0
                return t
            capture(seqs, labels, [-1 if e.episode is None else e.episode for e in batch])
        for states, k in ((negatives, 0), (text or {}, 3)):
            if states:
                n = next(iter(states.values())).shape[0]
                xs_all.append(torch.stack([states[l] for l in layers]))
                kinds.append(torch.full((n,), k, dtype=torch.long, device=dev))
                owners.append(torch.full((n,), -1, dtype=torch.long, device=dev))
        return layers, torch.cat(xs_all, 1), torch.cat(kinds), torch.cat(owners)

    @torch.no_grad()
    def fit_gate(self, examples: list[Example], owners: dict[str, set[int] | None],
                 negatives: dict[int, torch.Tensor], cap: int = 320,
                 text: dict[int, torch.Tensor] | None = None) -> dict:
        """Before distillation, fit each new expert's gate in every layer as a logistic classifier
        on the pre-sleep hidden states of the sleep's own data (`gate_states`): open on its
        episodes' questions and answers (`owners[expert]`; None = every episode example), closed
        on the anchors, the self-replay, the everyday prompts, the plain-text document (`text`,
        `gate_text_states`) and the other new experts' episodes (`gate_fit_weights`;
        `gate_fit_steps` full-batch Adam steps on at most `cap` tokens per group). Born closed at
        σ(−6), the gate would otherwise need most of a short sleep to open, and the expert could
        not learn at full strength on its own episodes."""
        if self.cfg.gate_fit_steps == 0 or not owners:
            return {}
        layers, x, kind, episode = self.gate_states(examples, list(owners), negatives, text)
        expert_ids = [e for e in owners if all(l in self._trained_layers(e) for l in layers)]
        if not expert_ids:
            return {}
        rows, weights, targets, counts = self.gate_fit_weights(kind, episode, [owners[e] for e in expert_ids], cap)
        fitted = [e for e, c in zip(expert_ids, counts) if c]
        if not fitted:
            return {}
        keep = [i for i, c in enumerate(counts) if c]
        modules = [[self._trained_layers(e)[l] for l in layers] for e in fitted]
        first, last = self._fit_gates(modules, x[:, rows], weights[keep], targets[keep])
        fits = {e: {"gate_fit_first_loss": f, "gate_fit_loss": l, "gate_fit_tokens": counts[i]}
                for e, i, f, l in zip(fitted, keep, first, last)}
        return {**fits[fitted[0]], "gate_sharpness": self.cfg.gate_sharpness,
                "gate_threshold": self.cfg.gate_threshold, **({"gate_fits": fits} if len(fits) > 1 else {})}

    def gate_fit_weights(self, kind: torch.Tensor, episode: torch.Tensor, owned: list[set[int] | None], cap: int):
        """The tokens every gate fit reads (`rows`, sampled once for all the sleep's experts) and,
        per expert, a weight and a target on each of them, so that its loss
            ½ · mean over {its questions, its answers} of mean BCE(z, 1)
          + ½ · (1 − s) · mean BCE(z, 0) over the closed chat tokens and (at most `cap` tokens'
                worth of) the other experts' episode tokens
          + ½ · s · mean BCE(z, 0) over the plain-text document (kind 3), s = TEXT_SHARE
        is Σ_n weight_n · BCE(z_n, target_n) (then averaged over layers). The closed chat tokens
        are capped at 2·cap, each expert's questions and answers at `cap` each; the document is
        kept whole (its rare paragraph starts are what sampling would drop) but weighs a share only:
        the gate meets chat at chat time, and at a half share (its tokens counted like the chat's)
        the tiny model's gate stopped telling its episode's questions from everyday ones.
        `counts[i]` = the tokens per group of expert i, {} when it has no positives or no negatives."""
        dev = kind.device
        closed = self._sample((kind == 0).nonzero().squeeze(1), 2 * cap)
        text = (kind == 3).nonzero().squeeze(1)
        own_q, own_a = [], []
        for o in owned:
            asked = (kind == 1) | (kind == 2)
            own = asked if o is None else asked & torch.isin(episode, torch.tensor(sorted(o), device=dev))
            own_q.append(self._sample((own & (kind == 1)).nonzero().squeeze(1), cap))
            own_a.append(self._sample((own & (kind == 2)).nonzero().squeeze(1), cap))
        rows = torch.unique(torch.cat([closed, text, *own_q, *own_a]))   # sorted: a token's column is its rank
        at = lambda idx: torch.searchsorted(rows, idx).cpu()  # noqa: E731
        weights, targets = torch.zeros(len(owned), len(rows)), torch.zeros(len(owned), len(rows))
        counts = []
        for i in range(len(owned)):
            positives = [at(g) for g in (own_q[i], own_a[i]) if g.numel()]
            mine = torch.cat(positives) if positives else torch.zeros(0, dtype=torch.long)
            others = torch.cat([at(g) for j in range(len(owned)) if j != i for g in (own_q[j], own_a[j])]
                               + [torch.zeros(0, dtype=torch.long)])
            others = others[~torch.isin(others, mine)].unique()
            n_closed, n_other = closed.numel(), min(others.numel(), cap)
            if not positives or not n_closed + n_other + text.numel():
                counts.append({})
                continue
            for g in positives:
                weights[i, g] = 0.5 / len(positives) / g.numel()
            targets[i, mine] = 1.0
            share = 0.0 if not text.numel() else TEXT_SHARE if n_closed + n_other else 1.0
            if text.numel():
                weights[i, at(text)] = 0.5 * share / text.numel()
            if n_closed + n_other:
                weights[i, at(closed)] = 0.5 * (1 - share) / (n_closed + n_other)
            if others.numel():
                weights[i, others] = 0.5 * (1 - share) * n_other / (n_closed + n_other) / others.numel()
            counts.append({"question": own_q[i].numel(), "answer": own_a[i].numel(), "closed": n_closed,
                           "plain text": text.numel(), "other episodes": others.numel()})
        return rows, weights.to(dev), targets.to(dev), counts

    def _sample(self, rows: torch.Tensor, cap: int) -> torch.Tensor:
        if rows.numel() <= cap:
            return rows
        g = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        return rows[torch.randperm(rows.numel(), generator=g)[:cap].to(rows.device)]

    def _expert_layers(self, expert_id: str) -> dict:
        """layer → that layer's module of the expert."""
        return {layer: m for layer, mlp in self.memory.mlps.items() for m in mlp.experts if m.expert_id == expert_id}

    def _trained_layers(self, expert_id: str) -> dict:
        """`_expert_layers` from the lowest layer this sleep trains up (`trained_from`)."""
        return {layer: m for layer, m in self._expert_layers(expert_id).items() if layer >= self.trained_from}

    def _fit_gates(self, modules: list[list], x: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor):
        """All experts' gates in every layer at once: z = x·w_e + b_e for x (layers, tokens, d),
        loss_e = mean over layers of Σ_n weights[e, n]·BCE(z, targets[e, n]) + a little L2. The
        experts' parameters are disjoint, so the summed loss fits each as if alone; one batched
        matmul reads the tokens once per step for all of them (the fit is memory-bound: 30 layers ×
        ~1,600 tokens × 576 floats re-read per step; one expert alone took ~10 s at 1 thread).
        Then each gate is sharpened to σ(k·(z − θ)) and written into its modules. Returns each
        expert's loss before and after."""
        cfg = self.cfg
        w = torch.stack([torch.stack([m.gate.detach().float() for m in ms]) for ms in modules]).transpose(0, 1)
        b = torch.stack([torch.stack([m.gate_bias.detach().float() for m in ms]) for ms in modules]).T
        w, b = w.clone().requires_grad_(True), b.clone().contiguous().requires_grad_(True)   # (L, E, d), (L, E)
        opt = torch.optim.Adam([w, b], lr=cfg.gate_fit_lr)

        def loss_per_expert():
            z = torch.bmm(w, x.transpose(1, 2)) + b[..., None]          # (L, E, N)
            bce = F.binary_cross_entropy_with_logits(z, targets.expand_as(z), reduction="none")
            return (bce * weights).sum(-1).mean(0)                       # (E,)

        with torch.enable_grad():
            first = loss_per_expert().detach()
            for step in range(cfg.gate_fit_steps):
                if step % 25 == 0:
                    self.check()
                loss = loss_per_expert().sum() + 1e-3 * w.pow(2).sum(-1).mean(0).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            last = loss_per_expert().detach()
        # a calibrated classifier sits near 0.5 where it is unsure (shared words, the chat template):
        # σ(k·(z − θ)) keeps it shut there and open where it is sure (measured on dev after two
        # sleeps: everyday/own 0.35–0.45× → 0.015–0.037× at k = 3, θ = 2); it is the same affine gate
        k, theta = cfg.gate_sharpness, cfg.gate_threshold
        for e, ms in enumerate(modules):
            for layer, m in enumerate(ms):
                m.gate.copy_((k * w[layer, e].detach()).to(m.gate.dtype))
                m.gate_bias.copy_((k * (b[layer, e].detach() - theta)).to(m.gate_bias.dtype))
        return first.tolist(), last.tolist()

    def gate_loss(self, batch: list[Example], xs: dict[int, list], owners: dict[str, set[int] | None],
                  negatives: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Balanced binary cross-entropy of each new expert's gate σ(w·x + b) in every layer: open
        on its episode tokens of the batch, closed on its other tokens and on the everyday prompts.
        Open and closed weigh the same, and so do the episodes' questions and their answers (the
        answers have more tokens; a gate that opened on answers only would miss the question that
        should call the expert). x is detached: the loss trains the gate only, as a classifier."""
        losses = []
        for expert_id, owned in owners.items():
            modules = self._trained_layers(expert_id)
            for layer, got in xs.items():
                if not got or layer not in modules:
                    continue
                x = got[-1]   # the student's pass (a teacher pass, if any, came first)
                e = modules[layer]
                t = self.gate_targets(batch, x.shape[1], owned).to(x.device)
                z = x.float() @ e.gate.float() + e.gate_bias.float()
                neg = z[t == 0]
                if layer in negatives:
                    neg = torch.cat([neg, negatives[layer] @ e.gate.float() + e.gate_bias.float()])
                pos = [F.binary_cross_entropy_with_logits(v, torch.ones_like(v)) for v in (z[t == 1], z[t == 2]) if v.numel()]
                parts = ([sum(pos) / len(pos)] if pos else []) + \
                    ([F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))] if neg.numel() else [])
                if parts:
                    losses.append(sum(parts) / len(parts))
        return torch.stack(losses).mean() if losses else None

    # -- the older experts' gates (locality across sleeps) -----------------------------------------
    @torch.no_grad()
    def close_older_gates(self, new_episodes, old_episodes, new_ids: list[str], cap: int = 4096) -> dict:
        """Shut every older routed expert's gate on this sleep's episodes, before the teacher
        writes: an older expert that opens on a new episode's names puts its facts into the
        teacher's answers and later into the new episode's (user check, third sleep: "Who first
        caught the lanternjaw pike?" → "… Philippa Venn from 1919", two older passages' names).
        Each gate moves from where it is (`gate_closing_loss`, `older_gate_steps` Adam steps): kept
        on the older episodes (text; subject questions of the taught ones; up to 32 episodes) and on
        everyday prompts, closed on the new episodes' text and subject questions. Returns per
        expert the mean over the new episodes' tokens (`new_…`) and the kept ones (`kept_…`) of
        its largest gate across layers, before and after."""
        older = [e.expert_id for e in self.memory.experts() if e.expert_id not in new_ids]
        if self.cfg.older_gate_steps == 0 or not older or not new_episodes:
            return {}
        close = self._closed_states(self._episode_reading(new_episodes), new_ids)
        everyday = self.rng.sample(GATE_NEGATIVE_PROMPTS, min(self.cfg.gate_negatives, len(GATE_NEGATIVE_PROMPTS)))
        olds = self.rng.sample(list(old_episodes), min(len(old_episodes), 32))   # cost bounded after long chats
        keep = self._closed_states(self._episode_reading(olds) + [chat_ids(self.tok, q) for q in everyday], new_ids)
        rows = self._sample(torch.arange(next(iter(keep.values())).shape[0]), cap)   # the same tokens in every layer
        keep = {layer: x[rows.to(x.device)] for layer, x in keep.items()}
        by_layers: dict[tuple, dict[str, list]] = {}   # experts with the same layers shut together
        for expert_id in older:
            modules = self._expert_layers(expert_id)
            layers = tuple(l for l in modules if l in close and l in keep)
            if layers:
                by_layers.setdefault(layers, {})[expert_id] = [modules[l] for l in layers]
        report = {}
        for layers, experts in by_layers.items():
            self.check()
            report.update(self._close_gates(experts, torch.stack([keep[l] for l in layers]),
                                            torch.stack([close[l] for l in layers])))
        return report

    def _episode_reading(self, episodes, window: int = 192) -> list[list[int]]:
        """Token sequences of what a gate meets of `episodes`: each text in windows, and the
        subject questions about the taught ones, bare and in the probes' answer prompt."""
        seqs = []
        for ep in episodes:
            ids = encode_text(self.tok, ep.text)
            seqs += windows(ids, window)
            if ep.kind == "taught":
                for j, name in enumerate(subjects(ep.text)):
                    q = subject_question(name, j)
                    seqs += [chat_ids(self.tok, q), chat_ids(self.tok, ANSWER_PROMPT.format(q=q))]
        return [s for s in seqs if s]

    def _close_gates(self, experts: dict[str, list], keep: torch.Tensor, close: torch.Tensor) -> dict:
        """The gates of `experts` (id → its modules, in the same layers), each in every layer, shut
        together; keep and close: (layers, tokens, d). The experts' parameters are disjoint and the
        loss is their sum, so each moves as if alone; one batched matmul reads the tokens once per
        step for all of them (memory-bound: one expert at a time took 5.8 s of a 50 s closing of
        six at 1 thread, profile 2026-12-04)."""
        w0 = torch.stack([torch.stack([m.gate.detach().float() for m in ms]) for ms in experts.values()])  # (E, L, d)
        b0 = torch.stack([torch.stack([m.gate_bias.detach().float() for m in ms]) for ms in experts.values()])
        logits = lambda w, b, x: torch.einsum("lnd,eld->eln", x, w) + b[..., None]   # noqa: E731  (E, L, N)
        p_keep = torch.sigmoid(logits(w0, b0, keep))
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=self.cfg.older_gate_lr)
        with torch.enable_grad():
            for _ in range(self.cfg.older_gate_steps):
                # gate_closing_loss means over the experts too: × E makes it their sum
                loss = len(experts) * gate_closing_loss(logits(w, b, keep), p_keep, logits(w, b, close)) \
                    + 1e-3 * (w - w0).pow(2).sum(-1).mean(-1).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        for ms, we, be in zip(experts.values(), w.detach(), b.detach()):
            for m, wl, bl in zip(ms, we, be):
                m.gate.copy_(wl.to(m.gate.dtype))
                m.gate_bias.copy_(bl.to(m.gate_bias.dtype))
        with torch.no_grad():   # per expert: its largest gate across layers, mean over the tokens
            peak = lambda w_, b_, x: torch.sigmoid(logits(w_, b_, x)).amax(1).mean(-1).tolist()   # noqa: E731
            readings = {k: peak(*wb, x) for k, (wb, x) in {"new_before": ((w0, b0), close), "new_after": ((w, b), close),
                                                          "kept_before": ((w0, b0), keep), "kept_after": ((w, b), keep)}.items()}
        return {eid: {k: round(v[e], 4) for k, v in readings.items()} for e, eid in enumerate(experts)}

    # -- the objective -------------------------------------------------------------------------
    def divergence(self, batch: list[Example], new_ids: list[str]) -> torch.Tensor:
        if all(e.teacher_logits is not None for e in batch):
            t_logits = torch.cat([e.teacher_logits for e in batch]).float()
        else:
            with torch.no_grad(), self.memory.configured(muted=new_ids, fast_weights=self.teacher_fast):
                t_logits = _scored_answer_logits(self.lm, [e.teacher for e in batch], [e.n_answer for e in batch],
                                                 self.pad)
        student = self.frozen or FrozenBelow(self.lm, 0, self.pad)
        with self.memory.configured(muted=self.student_muted, fast_weights=False):
            s_logits = student.logits([e.student for e in batch], [e.n_answer for e in batch])
        return generalized_jsd_loss(s_logits, t_logits, beta=self.cfg.beta)

    def on_policy(self, batch: list[Example], new_ids: list[str]) -> list[Example]:
        """Replace the teacher's answer by the student's own sample in a fraction λ of the batch
        (GKD's on-policy half): the same tokens then follow the teacher's prompt, so `divergence`
        scores the teacher on what the student would say."""
        chats = [i for i, e in enumerate(batch) if e.prompt]   # plain-text anchors have no prompt to answer
        k = min(round(self.cfg.lmbda * len(batch)), len(chats))
        if k == 0:
            return batch
        chosen = self.rng.sample(chats, k)
        prompts = [batch[i].student[:len(batch[i].student) - batch[i].n_answer] for i in chosen]
        with self.memory.configured(muted=self.student_muted, fast_weights=False):   # the student's own view
            samples = generate_batch(self.lm, self.tok, prompts, self.cfg.answer_tokens, temperature=0.7,
                                     seed=self.rng.randrange(1 << 30))
        batch = list(batch)
        for i, p, s in zip(chosen, prompts, samples):
            if s:
                e = batch[i]
                t_prompt = e.teacher[:len(e.teacher) - e.n_answer]
                batch[i] = Example(p + s, t_prompt + s, len(s), e.prompt, self.tok.decode(s),
                                   about_episode=e.about_episode, episode=e.episode)
        return batch

    def imitation(self, examples: list[Example], step: int) -> tuple[torch.Tensor, float]:
        """Learning to Imitate: cut teacher texts at a random point, let the student complete them,
        reward the completions, policy gradient with the group mean as baseline."""
        cfg = self.cfg
        # imitate what the teacher wrote about the episodes, not the anchors or replayed answers
        own = [e for e in examples if e.about_episode] or examples
        long = [e for e in own if e.n_answer >= 12] or own
        picks = [self.rng.choice(long) for _ in range(cfg.lti_prefixes)]
        prompts, refs, meta = [], [], []
        for e in picks:
            answer = e.student[len(e.student) - e.n_answer:]
            cut = self.rng.randint(max(1, int(0.3 * len(answer))), max(1, int(0.7 * len(answer))))
            prompt = e.student[:len(e.student) - e.n_answer] + answer[:cut]
            ref = self.tok.decode(answer[cut:cut + cfg.lti_tokens], skip_special_tokens=True)
            for _ in range(cfg.lti_group):
                prompts.append(prompt)
                refs.append(ref)
            meta.append((self.tok.decode(answer[:cut], skip_special_tokens=True), ref))
        with self.memory.configured(fast_weights=False):
            completions = generate_batch(self.lm, self.tok, prompts, cfg.lti_tokens, temperature=1.0, top_p=0.95,
                                         seed=self.rng.randrange(1 << 30), batch_size=32)
        texts = [self.tok.decode(c, skip_special_tokens=True) for c in completions]
        scores = imitation_rewards(texts, refs, cfg.gamma, cfg.tau_sem, cfg.z0, cfg.semantic_reward)
        for i, (prefix, ref) in enumerate(meta):
            j = i * cfg.lti_group   # report the first completion of each group
            self.emit("sample", step=step + 1, prefix=prefix, teacher=ref, student=texts[j], **scores[j])
        seqs = [p + (c or [self.tok.eos_token_id]) for p, c in zip(prompts, completions)]
        lens = [max(len(c), 1) for c in completions]
        with self.memory.configured(fast_weights=False):
            logits = _forward_answer_logits(self.lm, seqs, lens, self.pad)
        targets = _answer_targets(seqs, lens, logits.device)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        per_seq = torch.stack([chunk.sum() for chunk in logp.split(lens)])
        rewards = torch.tensor([s["reward"] for s in scores], device=per_seq.device)
        loss = group_policy_gradient_loss(per_seq, rewards, torch.tensor(lens, device=per_seq.device), cfg.lti_group)
        return loss, float(rewards.mean())

    def step_loss(self, batch: list[Example], new_ids: list[str], gate: tuple | None, imitate: list | None,
                  step: int) -> tuple[torch.Tensor, torch.Tensor, float | None, float | None]:
        """One step's loss: the divergence on `batch`; on an imitation step (`imitate`: the
        examples) α·divergence + (1 − α)·policy-gradient loss; with `gate` (owners, negatives) the
        gate's BCE on top, weighted `gate_loss`. Returns (loss, divergence, reward, gate loss)."""
        cfg = self.cfg
        if gate is not None:
            with self.memory.capturing() as xs:
                div = self.divergence(batch, new_ids)
            gl = self.gate_loss(batch, xs, *gate)
            del xs
        else:
            div, gl = self.divergence(batch, new_ids), None
        loss, reward = div, None
        if imitate is not None:
            pg, reward = self.imitation(imitate, step)
            loss = cfg.alpha * div + (1 - cfg.alpha) * pg
        if gl is not None:
            loss = loss + cfg.gate_loss * gl
        return loss, div, reward, None if gl is None else float(gl.detach())

    def prepare_gates(self, examples: list[Example], new_ids: list[str], owners: dict) -> tuple[dict, dict, float]:
        """Fit the new experts' gates (`fit_gate`); with `gate_frozen` they then stay as fitted: the
        experts learn under the gates they will have, and nothing reopens them. Returns the fit's
        numbers, the closed states for a gate loss during distillation (with the plain-text document
        when the gate still trains) and the seconds."""
        if self.cfg.gate_loss <= 0:
            return {}, {}, 0.0
        t0 = time.perf_counter()
        negatives, text = self.gate_negative_states(new_ids), self.gate_text_states(new_ids)
        fitted = self.fit_gate(examples, owners, negatives, text=text)
        if fitted and self.cfg.gate_frozen:
            for m in (m for eid in new_ids for m in self.memory.expert_modules(eid)):
                m.gate.requires_grad_(False)
                m.gate_bias.requires_grad_(False)
        elif text:   # a gate trained during distillation stays shut on the document too
            negatives = {l: torch.cat([v for v in (negatives.get(l), text.get(l)) if v is not None])
                         for l in negatives.keys() | text.keys()}
        return fitted, negatives, round(time.perf_counter() - t0, 1)

    def seed(self, examples: list[Example], new_ids: list[str], owners: dict[str, set[int]] | None = None,
             phase: str = "consolidation") -> dict:
        """Train the new experts (only) on the teacher's data; returns summary numbers. `owners`:
        expert → the episodes its gate opens on (default: each new expert, every episode example)."""
        cfg = self.cfg
        if not examples:   # the teacher wrote nothing usable: nothing to seed, the expert stays zero
            return {"steps": 0, "examples": 0, "final_divergence": None, "first_divergence": None,
                    "mean_reward": None}
        owners = owners or {eid: None for eid in new_ids}
        params = self.memory.train_only(new_ids, from_layer=self.trained_from)
        fitted, negatives, gate_s = self.prepare_gates(examples, new_ids, owners)
        gate_on = cfg.gate_loss > 0 and not (fitted and cfg.gate_frozen)
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
        # Every step: a batch of answers (episodes, replay, chat anchors) plus a few plain-text
        # anchors, so the pull to keep everyday text unchanged never skips a step.
        pool = [e for e in examples if e.prompt]
        texts = [e for e in examples if not e.prompt]
        if not pool:
            pool, texts = texts, []
        planned = total = distill_steps(cfg, len(pool)) + (cfg.lti_steps if cfg.lti else 0)
        lti_at = set(range(total - cfg.lti_steps, total)) if cfg.lti else set()
        divergences, rewards, seconds = [], [], []
        per_step = min(cfg.anchor_texts_per_step, len(texts))
        order: list[int] = []
        gate_losses: list[float] = []
        self.frozen = FrozenBelow(self.lm, self.trained_from, self.pad)
        try:
            for step in range(planned):
                self.check()
                t0 = time.perf_counter()
                if len(order) < cfg.batch_size:
                    order += self.rng.sample(range(len(pool)), len(pool))
                batch = [pool[i] for i in order[:cfg.batch_size]]
                del order[:cfg.batch_size]
                if cfg.lmbda > 0:
                    batch = self.on_policy(batch, new_ids)
                batch += [texts[(step * per_step + j) % len(texts)] for j in range(per_step)]
                loss, div, reward, gl = self.step_loss(batch, new_ids, (owners, negatives) if gate_on else None,
                                                       examples if step in lti_at else None, step)
                if reward is not None:
                    rewards.append(reward)
                if gl is not None:
                    gate_losses.append(gl)
                self.check()   # between forward and backward too: a step is seconds long on a CPU
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                divergences.append(float(div.detach()))
                seconds.append(time.perf_counter() - t0)
                total = steps_that_fit(step + 1, total, seconds, self.training.left())
                if cfg.lti and step + 1 < total:   # imitation keeps its place at the end of a shortened run
                    lti_at = set(range(max(step + 1, total - cfg.lti_steps), total))
                self.emit("loss", phase=phase, step=step + 1, total=total, divergence=divergences[-1],
                          reward=reward, seconds=round(seconds[-1], 3))
                if step + 1 >= total:
                    break
        finally:
            self.memory.freeze_all()
            self.frozen = None
        return {"steps": len(divergences), "planned_steps": planned, "examples": len(examples), **self.written,
                "trained_from_layer": self.trained_from,
                "gate_s": gate_s, "training_s": round(sum(seconds), 1), "final_divergence": divergences[-1] if divergences else None,
                "first_divergence": divergences[0] if divergences else None,
                "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                **fitted, "study_questions": self.studied, "first_gate_loss": gate_losses[0] if gate_losses else None,
                "final_gate_loss": gate_losses[-1] if gate_losses else None}
