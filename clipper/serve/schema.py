"""The request bodies of `clipper serve`, as pydantic models: they are the OpenAPI schemas at
/openapi.json (and /docs), and the one list of the fields each endpoint takes. The server checks
bodies itself (its limits, its one-line errors), so these models describe and do not parse."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..generate import GenerationConfig

_IMAGE = "an image: base64, or a data: URI (multipart/form-data: the file)"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _generation_options() -> type[BaseModel]:
    """GenerationConfig's fields, with their defaults and help, as a model."""
    hints = typing.get_type_hints(GenerationConfig)
    fields = {f.name: (hints[f.name], Field(f.default, description=f.metadata.get("help")))
              for f in dataclasses.fields(GenerationConfig)}
    return create_model("GenerationOptions", __base__=_Body, **fields)


GenerationOptions = _generation_options()


class EmbeddingsRequest(_Body):
    """OpenAI's embeddings request, plus `modality`."""
    input: str | list[str] = Field(description="texts, or with modality image: images (base64 or data: URIs)")
    modality: Literal["text", "image"] = Field("text", description="what `input` holds")
    model: str | None = Field(None, description="the served model's id (GET /v1/models); other ids are refused")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded "
                             "(what OpenAI's clients ask for by default)")
    dimensions: int | None = Field(None, description="the model's embedding size only: CLIP embeddings are not "
                                                     "trained to be shortened, so other sizes are refused")
    user: str | None = Field(None, description="accepted for OpenAI compatibility, not used")


class ClassifyRequest(_Body):
    image: str = Field(description=_IMAGE)
    labels: list[str] | str = Field(description="class names (a list, or one comma-separated string)")
    templates: list[str] | None = Field(None, description="prompt templates with one {} each, averaged "
                                                          "(default: 'a photo of a {}.')")
    k: int = Field(5, description="how many of the best labels to return")


class CaptionRequest(_Body):
    image: str | list[str] | None = Field(None, description=_IMAGE + "; or a list of them")
    images: list[str] | None = Field(None, description="the same as a list of `image`")
    prompt: str | None = Field(None, description="a text the caption continues")
    options: GenerationOptions | None = Field(None, description="how to generate (greedy by default)")


class SearchRequest(_Body):
    text: str | None = Field(None, description="the query text (give text or image)")
    image: str | None = Field(None, description=_IMAGE)
    k: int = Field(10, description="how many nearest indexed images to return")


class ChatRequest(_Body):
    """OpenAI's chat completion request, as far as a local VLM answers it."""
    messages: list[dict[str, Any]] = Field(description="{role: system|user|assistant, content: a string, or parts "
                                                       "{type: text, text} and (user) {type: image_url, image_url: "
                                                       "{url: a data: URL}}}; one image per chat")
    model: str | None = Field(None, description="the served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, description="most new tokens (default 256)")
    max_completion_tokens: int | None = Field(None, description="the same as max_tokens (OpenAI's newer name)")
    temperature: float | None = Field(None, description="sampling temperature (0 or none: greedy)")
    top_p: float | None = Field(None, description="nucleus sampling")
    seed: int | None = Field(None, description="sampling seed")
    repetition_penalty: float | None = Field(None, description="> 1 discourages repeated tokens")
    stream: bool = Field(False, description="server-sent events, a chunk per piece of text, then [DONE]")
    stop: str | list[str] | None = Field(None, description="up to 8 strings; the answer ends before the first")
    n: int = Field(1, description="1 only")
    frequency_penalty: float | None = Field(None, description="accepted at 0 only")
    presence_penalty: float | None = Field(None, description="accepted at 0 only")
    user: str | None = Field(None, description="accepted for OpenAI compatibility, not used")


REQUESTS: dict[str, type[BaseModel]] = {"embeddings": EmbeddingsRequest, "classify": ClassifyRequest,
                                        "caption": CaptionRequest, "search": SearchRequest, "chat": ChatRequest}
FORM_JSON_FIELDS = ("k", "options", "dimensions")  # multipart fields that are not text: read as JSON
IMAGE_FIELDS = {"embeddings": ("input",), "classify": ("image",), "caption": ("image", "images"),
                "search": ("image",), "chat": ()}


def fields(name: str) -> tuple[str, ...]:
    return tuple(REQUESTS[name].model_fields)


def components() -> dict[str, Any]:
    """The request schemas, for the OpenAPI document's components: per endpoint its JSON body and
    its multipart form (the image fields as files)."""
    out: dict[str, Any] = {}
    for name, model in REQUESTS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
        form = {**schema, "title": model.__name__ + "Form", "properties": dict(schema["properties"])}
        for field in IMAGE_FIELDS[name]:
            form["properties"][field] = {"anyOf": [{"type": "string", "format": "binary"},
                                                   {"type": "array", "items": {"type": "string", "format": "binary"}}],
                                         "description": "image file(s); repeat the part for several"}
        out[model.__name__ + "Form"] = form
    return out


def request_body(name: str) -> dict[str, Any]:
    """An endpoint's `openapi_extra`: its JSON and multipart bodies by reference."""
    model = REQUESTS[name].__name__
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}},
        "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{model}Form"}}}}}
