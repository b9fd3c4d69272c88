"""The fake models the emulator serves.

Every model is deterministic: the same input gives the same output (file URLs
included, since file ids are derived from the input). Validation errors use the
shape fal's model apps (FastAPI + pydantic) answer with::

    {"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_IMAGES = 4
MAX_FILE_BYTES = 2_000_000_000

EXTENSIONS = {
    "video/mp4": "mp4",
    "video/webm": "webm",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "application/json": "json",
    "text/plain": "txt",
    "application/zip": "zip",
    "model/gltf-binary": "glb",
}


class RunContext(Protocol):
    """What a model may do besides computing JSON: create files served by the emulator."""

    def create_image(self, key: bytes, width: int, height: int, file_name: str) -> str:
        """Register a lazily rendered PNG; returns its URL."""
        ...

    def create_blob(self, key: bytes, size: int, content_type: str, file_name: str) -> str:
        """Register a deterministic, streamed blob of ``size`` bytes; returns its URL."""
        ...

    def read_file(self, url: str) -> Any:
        """The emulator's own file at ``url`` (a ``FileEntry`` with ``chunks()``), or None."""
        ...


class ValidationFailed(Exception):
    """Raised by a model's validator; ``errors`` is fal's 422 ``detail`` list."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


@dataclass(frozen=True)
class Model:
    """A fake model: ``run`` validates the input (raising ValidationFailed) and returns the output."""

    model_id: str
    run: Callable[[dict[str, Any], RunContext], Any]
    description: str = ""
    #: what fal bills it by, and the price of one unit in USD (served by the pricing API)
    unit: str = "requests"
    unit_price: float = 0.001


def billable_units(output: Any) -> float:
    """What a successful run bills (``X-Fal-Billable-Units``): one per image made, else one per request."""
    images = output.get("images") if isinstance(output, dict) else None
    return float(len(images)) if isinstance(images, list) and images else 1.0


def pricing(endpoint_id: str) -> list[dict[str, Any]]:
    """The pricing API's entries for ``endpoint_id`` (the model, or its app): empty when unknown."""
    found = resolve([part for part in endpoint_id.split("/") if part])
    if found is None:
        return []
    model = found[0]
    return [{"endpoint_id": endpoint_id, "unit_price": model.unit_price, "unit": model.unit, "currency": "USD"}]


# --------------------------------------------------------------------------- helpers


def _digest(*parts: Any) -> bytes:
    """A stable digest of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).digest()


def _error(loc: list[Any], msg: str, type_: str, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def _check_string(
    body: dict[str, Any], name: str, errors: list[dict[str, Any]], *, required: bool, non_empty: bool = False
) -> str | None:
    if name not in body or body[name] is None:
        if required:
            errors.append(_error([name], "Field required", "missing"))
        return None
    value = body[name]
    if not isinstance(value, str):
        errors.append(_error([name], "Input should be a valid string", "string_type"))
        return None
    if non_empty and not value:
        errors.append(_error([name], "String should have at least 1 character", "string_too_short", {"min_length": 1}))
        return None
    return value


def _check_int(
    value: Any, loc: list[Any], errors: list[dict[str, Any]], *, lo: int | None = None, hi: int | None = None
) -> int | None:
    if not _is_int(value):
        errors.append(_error(loc, "Input should be a valid integer", "int_type"))
        return None
    number = int(value)
    if lo is not None and number < lo:
        errors.append(_error(loc, f"Input should be greater than or equal to {lo}", "greater_than_equal", {"ge": lo}))
        return None
    if hi is not None and number > hi:
        errors.append(_error(loc, f"Input should be less than or equal to {hi}", "less_than_equal", {"le": hi}))
        return None
    return number


# --------------------------------------------------------------------------- text to image


def _image_size(value: Any, errors: list[dict[str, Any]]) -> tuple[int, int] | None:
    if isinstance(value, str):
        if value in IMAGE_SIZE_PRESETS:
            return IMAGE_SIZE_PRESETS[value]
        names = ", ".join(f"'{name}'" for name in IMAGE_SIZE_PRESETS)
        errors.append(_error(["image_size"], f"Input should be {names}", "enum", {"expected": names}))
        return None
    if isinstance(value, dict):
        before = len(errors)
        sides = []
        for side in ("width", "height"):
            if side not in value:
                errors.append(_error(["image_size", side], "Field required", "missing"))
                continue
            sides.append(_check_int(value[side], ["image_size", side], errors, lo=MIN_SIDE, hi=MAX_SIDE))
        if len(errors) > before or len(sides) != 2 or None in sides:
            return None
        return int(sides[0]), int(sides[1])  # type: ignore[arg-type]
    errors.append(_error(["image_size"], "Input should be a valid string or a valid dictionary", "union_type"))
    return None


def _text_to_image(model_id: str, default_size: str) -> Callable[[dict[str, Any], RunContext], Any]:
    def run(body: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        errors: list[dict[str, Any]] = []
        prompt = _check_string(body, "prompt", errors, required=True, non_empty=True)
        size = _image_size(body.get("image_size", default_size), errors)
        num_images = 1
        if body.get("num_images") is not None:
            num_images = _check_int(body["num_images"], ["num_images"], errors, lo=1, hi=MAX_IMAGES) or 1
        seed: int | None = None
        if body.get("seed") is not None:
            seed = _check_int(body["seed"], ["seed"], errors)
        if errors:
            raise ValidationFailed(errors)
        assert prompt is not None and size is not None
        if seed is None:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
        width, height = size
        images = []
        for index in range(num_images):
            key = _digest(model_id, prompt, seed, width, height, index)
            file_name = f"{key.hex()[:16]}.png"
            url = ctx.create_image(key, width, height, file_name)
            images.append(
                {
                    "url": url,
                    "width": width,
                    "height": height,
                    "content_type": "image/png",
                    "file_name": file_name,
                }
            )
        digest = _digest(model_id, prompt, seed, width, height, num_images)
        inference = round(0.2 + int.from_bytes(digest[:2], "big") / 65535 * 1.8, 4)
        return {
            "images": images,
            "timings": {"inference": inference},
            "seed": seed,
            "has_nsfw_concepts": [False] * num_images,
            "prompt": prompt,
        }

    return run


# --------------------------------------------------------------------------- others

_WORDS = (
    "light",
    "river",
    "quiet",
    "amber",
    "signal",
    "garden",
    "orbit",
    "paper",
    "stone",
    "winter",
    "cedar",
    "harbor",
    "velvet",
    "echo",
    "meadow",
    "copper",
    "lantern",
    "silver",
    "canyon",
    "breeze",
)


def _any_llm(body: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    prompt = _check_string(body, "prompt", errors, required=True, non_empty=True)
    model = _check_string(body, "model", errors, required=False)
    _check_string(body, "system_prompt", errors, required=False)
    if errors:
        raise ValidationFailed(errors)
    assert prompt is not None
    model = model or "google/gemini-flash-1.5"
    digest = _digest("fal-ai/any-llm", prompt, model, body.get("system_prompt"))
    words = " ".join(_WORDS[b % len(_WORDS)] for b in digest[:12])
    excerpt = prompt if len(prompt) <= 200 else prompt[:197] + "..."
    output = f"[emulated {model}] You asked: {excerpt!r}. Answer: {words}."
    return {"output": output, "partial": False, "error": None}


def _echo(body: dict[str, Any], ctx: RunContext) -> Any:
    return body


def _file(body: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    size: int | None = None
    if body.get("size_bytes") is None:
        errors.append(_error(["size_bytes"], "Field required", "missing"))
    else:
        size = _check_int(body["size_bytes"], ["size_bytes"], errors, lo=0, hi=MAX_FILE_BYTES)
    content_type = body.get("content_type", "video/mp4")
    if not isinstance(content_type, str) or not content_type:
        errors.append(_error(["content_type"], "Input should be a valid string", "string_type"))
    key = body.get("key", "video")
    if not isinstance(key, str) or not key:
        errors.append(_error(["key"], "Input should be a valid string", "string_type"))
    if errors:
        raise ValidationFailed(errors)
    assert size is not None
    digest = _digest("emulator/file", size, content_type, key)
    extension = EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")
    file_name = f"{digest.hex()[:16]}.{extension}"
    url = ctx.create_blob(digest, size, content_type, file_name)
    return {key: {"url": url, "content_type": content_type, "file_name": file_name, "file_size": size}}


def _describe_file(body: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Reads ``file_url`` (or ``image_url``): a ``data:`` URI or a file the emulator serves (an
    upload); answers its size, sha256 and type, as a model that fetched its input would see it."""
    field = "file_url" if "file_url" in body else "image_url"
    errors: list[dict[str, Any]] = []
    url = _check_string(body, field, errors, required=True, non_empty=True)
    if errors or url is None:
        raise ValidationFailed(errors or [_error([field], "Field required", "missing")])
    digest, size = hashlib.sha256(), 0
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        data = base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
        chunks, source, content_type = [data], "data_uri", header[5:].split(";")[0]
    else:
        entry = ctx.read_file(url)
        if entry is None:
            raise ValidationFailed([_error([field], "File could not be downloaded", "file_download_error")])
        chunks, source, content_type = entry.chunks(), "url", entry.content_type
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return {
        "source": source,
        "url": url if source == "url" else None,
        "size": size,
        "sha256": digest.hexdigest(),
        "content_type": content_type,
    }


MODELS: dict[str, Model] = {
    model.model_id: model
    for model in (
        Model("fal-ai/fast-sdxl", _text_to_image("fal-ai/fast-sdxl", "square_hd"), "text to image", "images", 0.002),
        Model("fal-ai/flux/dev", _text_to_image("fal-ai/flux/dev", "square_hd"), "text to image", "images", 0.025),
        Model(
            "fal-ai/flux/schnell", _text_to_image("fal-ai/flux/schnell", "square_hd"), "text to image", "images", 0.003
        ),
        Model("fal-ai/any-llm", _any_llm, "text generation", "requests", 0.002),
        Model("emulator/echo", _echo, "returns its input"),
        Model("emulator/file", _file, "a large streamed file of size_bytes"),
        Model("emulator/describe-file", _describe_file, "size and sha256 of the file at file_url/image_url"),
    )
}


def app_id_of(segments: list[str]) -> str:
    """The app id of a model path: two segments, three under ``workflows``/``comfy``."""
    count = 3 if segments and segments[0] in ("workflows", "comfy") else 2
    return "/".join(segments[:count])


def resolve(segments: list[str]) -> tuple[Model, str] | None:
    """The registered model that is the longest prefix of ``segments``, and the remaining subpath."""
    for length in range(len(segments), 0, -1):
        model = MODELS.get("/".join(segments[:length]))
        if model is not None:
            return model, "/".join(segments[length:])
    return None
