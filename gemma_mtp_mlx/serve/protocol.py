"""The OpenAI request bodies we accept, and the OpenAI error shape for everything we refuse.

Requests are validated with pydantic, strictly as OpenAI's API does: a field of the wrong type
(`"stream": "yes"`, `"max_tokens": "10"`) or a number that is not finite is refused, never
coerced. Fields we do not know are ignored (clients send vendor fields freely); fields we know
but cannot honour (n > 1, logprobs, tools, penalties...) are refused with a 400 that names them,
so that nobody silently gets something else than asked. Text the tokenizer cannot take (a lone
surrogate such as `"\ud800"`, which JSON can spell) is refused with a 400 naming its field.
Extensions follow vLLM's names: `top_k`, `ignore_eos`, `return_token_ids` (token ids of
the answer in each choice) and `chat_template_kwargs` (`enable_thinking` for Gemma 4).
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """A refusal in the OpenAI error shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# The seeds MLX's random keys take.
SEED_RANGE = (0, 2**64 - 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def refuse_unsupported(self) -> None:
        """A 400 naming the first parameter we cannot honour."""
        if self.n not in (None, 1):
            raise unsupported("n", "only n=1 is supported")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise unsupported("logprobs", "logprobs are not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise unsupported(name, f"{name} is not supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str
    content: str | list[dict] | None = None

    def text(self, index: int) -> str | list[dict]:
        """The content as one string, or with pictures (OpenAI `image_url` parts, a user's
        only) as `{"type": "image", "url"}` parts before the text, as images/messages.py
        takes them."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise ApiError(400, f"message {index} has no content", param=f"messages.{index}.content")
        texts, images = [], []
        for part in self.content:
            url = (part.get("image_url") or {}).get("url") if part.get("type") == "image_url" else None
            if isinstance(url, str) and self.role == "user":
                images.append({"type": "image", "url": url})
                continue
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(
                    f"messages.{index}.content", f"content parts of type {part.get('type')!r}"
                    " are not supported (text, and image_url in user messages)"
                )
            texts.append(part["text"])
        text = "".join(texts)
        return [*images, {"type": "text", "text": text}] if images else text


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, "tool calling is not supported")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise unsupported("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only the text response format is supported")
        extra = set(self.chat_template_kwargs or {}) - {"enable_thinking"}
        if extra:
            raise unsupported("chat_template_kwargs", f"unknown template arguments: {sorted(extra)}")

    def chat_messages(self) -> list[dict]:
        """The conversation for the chat template ("developer" is OpenAI's new "system")."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise unsupported(f"messages.{i}.role", f"role {m.role!r} is not supported")
            if m.model_extra and m.model_extra.get("tool_calls"):
                raise unsupported(f"messages.{i}.tool_calls", "tool calling is not supported")
            out.append({"role": role, "content": m.text(i)})
        return out

    @property
    def thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking"))


class CompletionRequest(_Request):
    prompt: str | Annotated[list[int], Field(min_length=1)] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.prompt and isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise unsupported("prompt", "one prompt per request")
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of is not supported")


    def single_prompt(self) -> str | list[int]:
        """The text, or the token ids, of the one prompt."""
        if self.prompt and isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_parameter")


def parse(model: type[_Request], data: Any) -> _Request:
    """A validated request, or a 400 naming the first field at fault."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    where = lone_surrogate(data)
    if where is not None:
        raise ApiError(400, f"{where}: not valid Unicode text (a lone surrogate)", param=where)
    try:
        request = model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None
    request.refuse_unsupported()
    return request


def lone_surrogate(data: Any) -> str | None:
    """The path (`messages.0.content`) of the first string value in `data` that UTF-8 cannot
    encode, or None. JSON's escapes can spell half a surrogate pair, which no tokenizer takes."""
    pending = [("", data)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, inner in reversed(list(items)):
                key = str(key).encode("utf-8", "replace").decode()  # shown: no surrogate in it
                pending.append((f"{where}.{key}" if where else key, inner))
    return None
