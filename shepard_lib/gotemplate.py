"""The subset of Go templates (with consul-template functions) that Shepard evaluates.

The simulated Nomad client renders task templates with it, and ``shepard job check`` evaluates a
job's ``shepard.tpl`` with it to see which Consul key the task would really read.

Supported: literal text, ``{{ ... }}`` actions with ``{{-`` / ``-}}`` whitespace trimming and
``{{/* comments */}}``, pipelines joined by ``|`` (the piped value becomes the last argument),
parenthesised sub-pipelines, string literals (``"..."`` with Go escapes, and raw `` `...` ``),
integer literals, and exactly these functions: ``key``, ``keyOrDefault``, ``printf``, ``env``,
``replaceAll``. Anything else fails as it would fail a real template (``function "x" not defined``),
so a template that only works in the simulator cannot slip through.

``key`` of a missing key does not fail: like consul-template it blocks, which the renderer reports
as :class:`MissingKey` so the client can wait for the key and render again.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["MissingKey", "RenderResult", "TemplateError", "render"]

KVLookup = Callable[[str], bytes | None]


class TemplateError(ValueError):
    """The template text is not valid in the supported subset (parse or execution error)."""


class MissingKey(LookupError):
    """``key`` read a Consul key that does not exist yet: a real template blocks until it does."""

    def __init__(self, key: str, keys_read: frozenset[str]) -> None:
        self.key = key
        self.keys_read = keys_read
        super().__init__(f"Missing: kv.block({key})")


@dataclass(frozen=True)
class RenderResult:
    """The rendered text and every Consul key the template read (its dependencies)."""

    text: str
    keys_read: frozenset[str]


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\\n]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<num>-?\d+)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[|()])
    )""",
    re.VERBOSE,
)
_PRINTF_VERB = re.compile(r"%([-+# 0]*\d*(?:\.\d+)?)([svdq%])")


def render(text: str, env: Mapping[str, str], lookup: KVLookup) -> RenderResult:
    """Render ``text`` with ``env`` as the ``env`` function's variables and ``lookup`` reading Consul KV.

    Raises :class:`TemplateError` for text outside the subset and :class:`MissingKey` when ``key``
    reads a missing key.
    """
    ctx = _Context(env, lookup)
    out: list[str] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(text):
        literal = text[pos : m.start()]
        if trim_next:
            literal = literal.lstrip()
        if m.group(1):
            literal = literal.rstrip()
        out.append(literal)
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(_to_text(_Parser(body).parse_action().evaluate(ctx)))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = text[pos:]
    if "{{" in tail:
        raise TemplateError("unclosed action: '{{' without a matching '}}'")
    out.append(tail.lstrip() if trim_next else tail)
    return RenderResult("".join(out), frozenset(ctx.keys_read))


class _Context:
    def __init__(self, env: Mapping[str, str], lookup: KVLookup) -> None:
        self.env = env
        self.lookup = lookup
        self.keys_read: set[str] = set()

    def read(self, key: str) -> str | None:
        self.keys_read.add(key)
        value = self.lookup(key)
        return None if value is None else value.decode("utf-8", errors="replace")


Value = str | int


class _Node:
    def evaluate(self, ctx: _Context) -> Value:
        raise NotImplementedError


@dataclass(frozen=True)
class _Literal(_Node):
    value: Value

    def evaluate(self, ctx: _Context) -> Value:
        return self.value


@dataclass(frozen=True)
class _Call(_Node):
    name: str
    args: tuple[_Node, ...]

    def evaluate(self, ctx: _Context, piped: tuple[Value, ...] = ()) -> Value:
        values = tuple(a.evaluate(ctx) for a in self.args) + piped
        return _call(ctx, self.name, values)


@dataclass(frozen=True)
class _Pipeline(_Node):
    commands: tuple[_Node, ...]

    def evaluate(self, ctx: _Context) -> Value:
        value = self.commands[0].evaluate(ctx)
        for command in self.commands[1:]:
            if not isinstance(command, _Call):
                raise TemplateError("can't give argument to non-function in a pipeline")
            value = command.evaluate(ctx, (value,))
        return value


def _call(ctx: _Context, name: str, args: tuple[Value, ...]) -> Value:
    if name == "key":
        key = _arity(name, args, 1)[0]
        value = ctx.read(key)
        if value is None:
            raise MissingKey(key, frozenset(ctx.keys_read))
        return value
    if name == "keyOrDefault":
        key, default = _arity(name, args, 2)
        value = ctx.read(key)
        return default if value is None else value
    if name == "env":
        return ctx.env.get(_arity(name, args, 1)[0], "")
    if name == "replaceAll":
        old, new, subject = _arity(name, args, 3)
        return subject.replace(old, new)
    if name == "printf":
        if not args or not isinstance(args[0], str):
            raise TemplateError("wrong number of args for printf: want at least 1 got 0")
        return _printf(args[0], args[1:])
    raise TemplateError(f'function "{name}" not defined')


def _arity(name: str, args: tuple[Value, ...], want: int) -> list[str]:
    if len(args) != want:
        raise TemplateError(f"wrong number of args for {name}: want {want} got {len(args)}")
    return [_to_text(a) for a in args]


def _printf(fmt: str, args: tuple[Value, ...]) -> str:
    remaining = list(args)

    def one(m: re.Match[str]) -> str:
        flags, verb = m.group(1), m.group(2)
        if verb == "%":
            return "%"
        if not remaining:
            return f"%!{verb}(MISSING)"
        arg = remaining.pop(0)
        if verb == "q":
            return '"' + _to_text(arg).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if verb == "d":
            if not isinstance(arg, int):
                return f"%!d(string={arg})"
            return ("%" + flags + "d") % arg
        return ("%" + flags + "s") % _to_text(arg)

    out = _PRINTF_VERB.sub(one, fmt)
    if remaining:
        extra = ", ".join(f"{type(a).__name__}={a}" for a in remaining)
        out += f"%!(EXTRA {extra})"
    return out


def _to_text(value: Value) -> str:
    return value if isinstance(value, str) else str(value)


class _Parser:
    """Recursive-descent parser of one action body."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.tokens = self._tokenize(body)
        self.pos = 0

    def _tokenize(self, body: str) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        i = 0
        while i < len(body):
            if body[i:].strip() == "":
                break
            m = _TOKEN.match(body, i)
            if not m or m.end() == i:
                raise TemplateError(f"unexpected {body[i:].strip()[:1]!r} in action {{{{ {body} }}}}")
            kind = m.lastgroup or ""
            tokens.append((kind, m.group(kind)))
            i = m.end()
        return tokens

    def parse_action(self) -> _Node:
        if not self.tokens:
            raise TemplateError("missing value for command")
        node = self._pipeline()
        if self.pos != len(self.tokens):
            raise TemplateError(f"unexpected {self.tokens[self.pos][1]!r} in action {{{{ {self.body} }}}}")
        return node

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _pipeline(self) -> _Node:
        commands = [self._command()]
        while (tok := self._peek()) is not None and tok == ("punct", "|"):
            self.pos += 1
            commands.append(self._command())
        return commands[0] if len(commands) == 1 else _Pipeline(tuple(commands))

    def _command(self) -> _Node:
        tok = self._peek()
        if tok is None or tok[1] in ("|", ")"):
            raise TemplateError(f"missing value for command in {{{{ {self.body} }}}}")
        if tok[0] == "ident":
            self.pos += 1
            args: list[_Node] = []
            while (nxt := self._peek()) is not None and nxt[1] not in ("|", ")"):
                args.append(self._operand())
            return _Call(tok[1], tuple(args))
        node = self._operand()
        if (nxt := self._peek()) is not None and nxt[1] not in ("|", ")"):
            raise TemplateError(f"can't give argument to non-function {tok[1]}")
        return node

    def _operand(self) -> _Node:
        kind, text = self.tokens[self.pos]
        self.pos += 1
        if kind == "str":
            try:
                return _Literal(ast.literal_eval(text))
            except (SyntaxError, ValueError) as exc:
                raise TemplateError(f"bad string literal {text}") from exc
        if kind == "raw":
            return _Literal(text[1:-1])
        if kind == "num":
            return _Literal(int(text))
        if kind == "ident":
            return _Call(text, ())
        if text == "(":
            node = self._pipeline()
            if self._peek() != ("punct", ")"):
                raise TemplateError(f"unclosed left paren in {{{{ {self.body} }}}}")
            self.pos += 1
            return node
        raise TemplateError(f"unexpected {text!r} in {{{{ {self.body} }}}}")
