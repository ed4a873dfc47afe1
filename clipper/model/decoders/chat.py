"""The text side of chat models (a VLM's processor, the llava decoder): chat templates over
content lists, image tokens expanded to what each image becomes, answers' labels for training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ... import io
from ...errors import ConfigError
from .spliced import IGNORE


def chat_template(folder: Path, tokenizer) -> str:
    """The folder's chat template: chat_template.jinja, chat_template.json, else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        template = io.read_json_object(folder / "chat_template.json", "chat template", {}).get("chat_template")
        if isinstance(template, str):
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise ConfigError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


@dataclass
class ImageText:
    """What each image token of a rendered prompt becomes: `tokens` image tokens per frame; with
    `around` set (Idefics3, SmolVLM), each tile's tokens behind `around` and its <row_r_col_c> tag,
    a line per row of tiles, then the global image's behind `around` and `global_tag`."""
    image_token: str
    tokens: int
    around: str | None = None
    global_tag: str = "<global-img>"

    def __call__(self, rows: int, cols: int) -> str:
        image = self.image_token * self.tokens
        if self.around is None:
            return image
        whole = f"{self.around}{self.global_tag}{image}{self.around}"
        if rows == 0 and cols == 0:
            return whole
        tiles = "".join("".join(f"{self.around}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                        for r in range(rows))
        return f"{tiles}\n{whole}"


class ChatText:
    """A chat model's text side: messages -> the prompt ids the language model reads (each image
    token replaced by its `ImageText`), ids -> text, and training rows (answer labels only)."""

    def __init__(self, folder: Path, tokenizer, template: str, text: ImageText):
        self.folder, self.tokenizer, self.template, self.text = folder, tokenizer, template, text
        self.image_token = text.image_token
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"{folder}: the tokenizer does not hold the image token {self.image_token!r} as one token")
        self.image_token_id = ids[0]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, image_texts: Sequence[str]) -> list[int]:
        """The ids of a rendered prompt holding one image token per entry of `image_texts`
        (`image_texts(images)`), each replaced by its text (as the processor's __call__: the
        tokenizer's special tokens added)."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(image_texts):
            raise ConfigError(f"prompt: {len(pieces) - 1} image token(s) {self.image_token!r} for "
                              f"{len(image_texts)} image(s)")
        expanded = pieces[0] + "".join(t + piece for t, piece in zip(image_texts, pieces[1:]))
        return self.tokenizer(expanded, add_special_tokens=True)["input_ids"]

    def answer_row(self, prompt: str, answer: str, image_texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """(ids, labels) of one user turn (its images, `prompt`) answered by `answer`: labels are the
        ids of the answer and its end of turn as the template renders them, IGNORE elsewhere."""
        question = [user_message(prompt, images=len(image_texts))]
        head = self.encode(self.render(question), image_texts)
        ids = self.encode(self.render([*question, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                      add_generation_prompt=False), image_texts)
        if ids[:len(head)] != head or len(ids) == len(head):
            raise ConfigError(f"chat template: the answer {answer[:60]!r} does not follow the question's tokens")
        return ids, [IGNORE] * len(head) + ids[len(head):]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def user_message(prompt: str, images: int = 1) -> dict:
    """One user turn in the processors' content-list form: the images first, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}
