"""Structured output: grammars compiled by llguidance, one matcher per constrained sequence.

Why llguidance rather than xgrammar (measured with `benchmarks/structured.py`, 5 JSON
schemas, the default model's 49k-token vocabulary; figures in README "Benchmarks"):
xgrammar's per-token mask is about 4x cheaper (7 us against 30 us mean) but it compiles
each new schema about 9x slower (8.5 ms against 0.9 ms), so a request with a fresh schema
(an agent's tool set) costs about the same with either; and xgrammar drags in
transformers and triton (about 1 GB) and takes 2.5 s to import, where llguidance is an
8 MB wheel with no dependencies that reads `tokenizer.json` itself. Strings with a
`maxLength` are llguidance's slow case (about 170 us a mask); end to end, constrained
decoding ran at 0.94x of free decoding at 16 streams.

`Grammars` compiles each distinct constraint once (an LRU of ready matchers, copied per
sequence) and is shared by the frontend, which compiles on a worker thread so a bad schema
is a 400 before the request is queued, and by the executor, which then only copies.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvmesh.types import StructuredOutput

CACHE_SIZE = 256  # distinct constraints kept compiled
CLOSERS = frozenset('"}]')
# Compact JSON, as OpenAI's structured outputs are: fewer tokens, and no endless runs of
# whitespace (which flexible whitespace lets a small model fall into).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
               "coerce_one_of": True}
_LAYOUT: Any = JSON_LAYOUT  # llguidance's JsonCompileOptions
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else",
               "propertyNames", "unevaluatedProperties", "additionalItems")


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema where an object that lists `properties` and says nothing of
    `additionalProperties` allows no other keys, as OpenAI's strict mode and vLLM's default
    do (a small model otherwise invents keys until max_tokens). Say
    `"additionalProperties": true` to allow them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = closed_objects(out[key])
    if ("properties" in out and "additionalProperties" not in out
            and "patternProperties" not in out):
        out["additionalProperties"] = False
    return out


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for a constraint. Raises ValueError when it is malformed."""
    import llguidance

    compile_ = llguidance.LLMatcher
    try:
        if spec.kind == "json":
            return compile_.grammar_from_json_schema({"type": "object"}, defaults=_LAYOUT)
        if spec.kind == "json_schema":
            schema = json.loads(spec.spec)
            schema = closed_objects({} if schema is True else schema)
            return compile_.grammar_from_json_schema(schema, defaults=_LAYOUT)
        if spec.kind == "regex":
            return compile_.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            return compile_.grammar_from_lark(_choice_lark(json.loads(spec.spec)))
        return llguidance.grammar_from("grammar", spec.spec)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"invalid {spec.kind} constraint: {exc}") from exc


def _choice_lark(choices: Any) -> str:
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError("guided_choice must be a non-empty list of non-empty strings")
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class Grammars:
    """Compiled constraints for one tokenizer. Thread-safe. The tokenizer is read on the
    first constrained request (about 0.3 s), so a server that never sees one never pays."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int,
                 eos_token_ids: Iterable[int]):
        self._tokenizer_json = tokenizer_json
        self._eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self._tok: Any = None
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._closers: ClosingMasks | None = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance

                self._tok = llguidance.LLTokenizer(self._tokenizer_json(),
                                                   n_vocab=self.vocab_size,
                                                   eos_token=self._eos or None)
            return self._tok

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def _compiled(self, spec: StructuredOutput) -> Any:
        with self._lock:
            m = self._cache.get(spec)
            if m is not None:
                self._cache.move_to_end(spec)
                return m
        import llguidance

        m = llguidance.LLMatcher(self._tokenizer(), grammar_text(spec), log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {spec.kind} constraint: {m.get_error()}")
        with self._lock:
            self._cache[spec] = m
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return m

    def closers(self) -> ClosingMasks:
        """The token classes that steer a JSON output to its end (built once)."""
        with self._lock:
            cached = self._closers
        if cached is not None:
            return cached
        tok = self._tokenizer()
        masks = ClosingMasks.empty(self.mask_words)
        for t in range(self.vocab_size):
            masks.add(t, tok.decode_str([t]))
        done = masks.done()
        with self._lock:
            self._closers = done
        return done

    def check(self, spec: StructuredOutput) -> None:
        """Compile (once); ValueError with the library's message when it cannot. Off the
        engine thread: the first JSON constraint also builds the closing masks here."""
        self._compiled(spec)
        if spec.is_json:
            self.closers()

    def matcher(self, spec: StructuredOutput) -> Matcher:
        tok = self._tokenizer()
        return Matcher(self._compiled(spec).deep_copy(), self.mask_words,
                       (lambda t: tok.decode_bytes([t])) if spec.is_json else None)


CLOSING_MARGIN = 8  # tokens to finish a key and give it an empty value, then end


class JsonDepth:
    """How deep the JSON written so far is nested (open objects and arrays, plus an open
    string): the fewest tokens that can close it."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self._escape = False

    def feed(self, data: bytes) -> None:
        for ch in data:
            if self.in_string:
                if self._escape:
                    self._escape = False
                elif ch == 0x5C:  # backslash
                    self._escape = True
                elif ch == 0x22:  # quote
                    self.in_string = False
            elif ch == 0x22:
                self.in_string = True
            elif ch in (0x7B, 0x5B):  # { [
                self.depth += 1
            elif ch in (0x7D, 0x5D) and self.depth:
                self.depth -= 1

    @property
    def to_close(self) -> int:
        return self.depth + int(self.in_string)


@dataclass
class ClosingMasks:
    """Bitmasks of tokens made only of `"`, `}` and `]`: those that end a string (start
    with `"`) and those that end objects and arrays (no `"`); and of tokens that open an
    object or array."""

    quote: np.ndarray
    ends: np.ndarray
    openers: np.ndarray

    @classmethod
    def empty(cls, words: int) -> ClosingMasks:
        return cls(*(np.zeros(words, dtype=np.uint32) for _ in range(3)))

    def add(self, token: int, text: str) -> None:
        word, bit = token // 32, np.uint32(1 << (token % 32))
        if text and set(text) <= CLOSERS:
            target = self.quote if text[0] == '"' else self.ends if '"' not in text else None
            if target is not None:
                target[word] |= bit
        if "{" in text or "[" in text:
            self.openers[word] |= bit

    def done(self) -> ClosingMasks:
        return ClosingMasks(*(m.view(np.int32) for m in (self.quote, self.ends, self.openers)))


def steer_to_close(allowed: np.ndarray, masks: ClosingMasks, in_string: bool) -> np.ndarray:
    """Near the end of its budget, a JSON output ends its string or closes its objects and
    arrays wherever the grammar allows, and otherwise takes a token that opens nothing new,
    so that it ends as parseable JSON with finish_reason "stop" rather than cut off by
    max_tokens. Where none of these is allowed it goes on freely."""
    for prefer in (masks.quote if in_string else masks.ends, ~masks.openers):
        narrowed = allowed & prefer
        if narrowed.any():
            return narrowed
    return allowed


class Matcher:
    """One sequence's grammar state. Follows the sequence's output tokens as they come."""

    def __init__(self, matcher: Any, words: int,
                 token_bytes: Callable[[int], bytes] | None = None):
        self._m = matcher
        self.num_consumed = 0
        self._mask = np.zeros(words, dtype=np.int32)
        self._token_bytes = token_bytes
        self.json = JsonDepth() if token_bytes is not None else None

    def follow(self, output_token_ids: Sequence[int]) -> None:
        """Consume the output tokens not seen yet (the last sampled one, normally)."""
        for token in output_token_ids[self.num_consumed:]:
            self._m.consume_token(token)  # a refused token leaves the matcher in error
            if self.json is not None and self._token_bytes is not None:
                self.json.feed(self._token_bytes(token))
        self.num_consumed = len(output_token_ids)

    @property
    def in_string(self) -> bool:
        return self.json is not None and self.json.in_string

    def should_close(self, max_tokens: int | None) -> bool:
        """A JSON output whose budget is about to run out before it can close."""
        if self.json is None or max_tokens is None:
            return False
        return max_tokens - self.num_consumed <= self.json.to_close + CLOSING_MARGIN + 1

    @property
    def failed(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    @property
    def is_stopped(self) -> bool:
        return bool(self._m.is_stopped())

    def allowed(self) -> np.ndarray:
        """The next token's allowed set as a bitmask (int32 words, bit i = token i). Once
        the grammar is complete only the end-of-sequence tokens are allowed."""
        self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        return self._mask
