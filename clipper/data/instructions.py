"""Instruction data: questions about an image and their answers, in LLaVA's conversation form
(`[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]`, kept in a
sample's json as "conversations"). A vision-language decoder trained with `instructions` > 0 learns
from one (question, answer) turn of a sample's conversation in place of its caption, that often.

For emoji they come from real metadata: the tts name, the CLDR keywords, Unicode's group and
subgroup, and what the name says of skin tone, gender or a flag's country; for Fashion-MNIST, the
garment. Each question in one of several phrasings, drawn per image (seeded)."""

from __future__ import annotations

import hashlib
import random
import re

IMAGE = "<image>"
MAX_TURNS, MAX_CHARS = 64, 4_000  # a conversation read from a sample's json is bounded

PHRASINGS = {
    "name": ("What emoji is this?", "What is the name of this emoji?", "Name this emoji."),
    "keywords": ("Give some keywords for this emoji.", "Which words describe this emoji?",
                 "List keywords for this emoji."),
    "group": ("Which Unicode group is this emoji in?", "What category does this emoji belong to?",
              "Which group of emoji is this from?"),
    "subgroup": ("Which Unicode subgroup is this emoji in?", "What subcategory is this emoji?"),
    "skin tone": ("What skin tone does this emoji have?", "Which skin tone is shown?"),
    "gender": ("Is this a man or a woman?", "What gender is the person in this emoji?"),
    "flag": ("Which country's flag is this?", "Whose flag is this?"),
    "garment": ("What garment is this?", "What kind of clothing is this?", "Which item of clothing is shown?"),
}
TONE = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")


def emoji_answers(meta: dict) -> dict[str, str]:
    """Question kind -> answer, for the kinds an emoji's metadata answers."""
    name = meta.get("name", "")
    out = {"name": name}
    if meta.get("keywords"):
        out["keywords"] = ", ".join(meta["keywords"])
    for field in ("group", "subgroup"):
        if meta.get(field):
            out[field] = meta[field]
    tones = TONE.findall(name)
    if tones:
        out["skin tone"] = ", ".join(dict.fromkeys(tones))
    words = set(re.findall(r"[a-z]+", name.lower()))
    men, women = bool(words & {"man", "men"}), bool(words & {"woman", "women"})
    if men != women:
        out["gender"] = "a man" if men else "a woman"
    if name.startswith("flag: "):
        out["flag"] = name[len("flag: "):]
    return out


def conversation(answers: dict[str, str], seed: str) -> list[dict]:
    """One turn per question kind of `answers`, each in a phrasing drawn by `seed`, in LLaVA's form
    (the image in the first)."""
    rng = random.Random(hashlib.sha1(seed.encode("utf-8")).hexdigest())
    turns = []
    for kind, answer in answers.items():
        question = rng.choice(PHRASINGS[kind])
        turns += [{"from": "human", "value": f"{IMAGE}\n{question}" if not turns else question},
                  {"from": "gpt", "value": answer}]
    return turns


def emoji_conversations(meta: dict) -> list[dict]:
    return conversation(emoji_answers(meta), meta.get("cp", meta.get("name", "")))


def question_answers(conversation) -> list[tuple[str, str]]:
    """(question, answer) of each human turn followed by a gpt turn, the image placeholder removed;
    [] where `conversation` is not LLaVA's form (bounded: at most MAX_TURNS turns of MAX_CHARS)."""
    if not isinstance(conversation, list) or len(conversation) > MAX_TURNS:
        return []
    out = []
    for ask, reply in zip(conversation[::2], conversation[1::2]):
        if not (isinstance(ask, dict) and isinstance(reply, dict) and ask.get("from") == "human"
                and reply.get("from") == "gpt"):
            return []
        question, answer = ask.get("value"), reply.get("value")
        if not (isinstance(question, str) and isinstance(answer, str) and answer.strip()
                and len(question) <= MAX_CHARS and len(answer) <= MAX_CHARS):
            return []
        out.append((question.replace(IMAGE, "").strip(), answer.strip()))
    return out
