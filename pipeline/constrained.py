"""Schema-constrained greedy decoding: a flat JSON template that a causal LM can only fill in.

A template is a list of parts, each a tuple:

- ``("lit", text)``: text forced token by token;
- ``("choice", key, options)``: exactly one of ``options``; a choice must be followed by a literal,
  whose first character is merged into the options so that none is a prefix of another;
- ``("free", key, limit)``: a JSON string body of at most ``limit`` tokens, drawn from the
  ``free_mask`` tokens; it must be followed by a literal that starts with the closing quote.

``Grammar`` tokenizes a template once; ``SchemaLogitsProcessor`` is a ``transformers`` logits
processor that masks each row of a batch to its own grammar and forces end-of-sequence after it.
It keeps per-row state across calls, so one processor serves one ``generate`` call. The module
needs torch only when a processor runs or a mask is built (imported there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Grammar", "SchemaLogitsProcessor", "Segment", "build_trie", "merge_literals", "string_token_mask"]


@dataclass
class Segment:
    """One tokenized part of a grammar.

    Attributes:
        kind: ``"lit"``, ``"choice"`` or ``"free"``.
        key: the field name (choices and free strings).
        tokens: a literal's token ids.
        trie: a choice's options as token -> subtrie; ``{}`` marks the end of an option.
        limit: a free string's maximum number of tokens.
        close: a free string's closing token (the first token of the literal after it).
    """

    kind: str
    key: str = ""
    tokens: list[int] = field(default_factory=list)
    trie: dict | None = None
    limit: int = 0
    close: int = -1


def build_trie(seqs: Sequence[Sequence[int]]) -> dict:
    """Token sequences as a nested dict; raises ``ValueError`` unless they are prefix-free."""
    root: dict = {}
    for seq in seqs:
        node = root
        for i, tok in enumerate(seq):
            if tok in node and (node[tok] == {} or i == len(seq) - 1):
                raise ValueError("choice options must be prefix-free")
            node = node.setdefault(tok, {})
    return root


def merge_literals(template: list[tuple]) -> list[tuple]:
    """Merge adjacent literals so each is tokenized once."""
    merged: list[tuple] = []
    for part in template:
        if part[0] == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + part[1])
        else:
            merged.append(part)
    return merged


def string_token_mask(tokenizer: Any, vocab_size: int) -> Any:
    """A bool tensor over ``vocab_size`` token ids: the tokens allowed inside a JSON string
    (printable text, no quote, backslash or control character; no special or added token)."""
    import torch

    n = min(len(tokenizer), vocab_size)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if i not in special and _is_string_text(text):
            mask[i] = True
    # Added (non-special) tokens such as chat markers are not text either.
    for tok_id in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        if tok_id < vocab_size:
            mask[tok_id] = False
    return mask


def _is_string_text(text: str) -> bool:
    if not text or '"' in text or "\\" in text or "\ufffd" in text:
        return False
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


class Grammar:
    """A flat JSON template of literals, closed choices and bounded free strings, tokenized.

    Attributes:
        segs: the template's segments, in order (empty literals dropped).
        free_mask: the bool tensor of tokens allowed inside free strings.
        max_tokens: an upper bound on the tokens a full continuation takes (end-of-sequence included).
    """

    def __init__(self, tokenizer: Any, template: list[tuple], free_mask: Any) -> None:
        parts = _merge_choice_delimiters(template)
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.segs: list[Segment] = []
        for i, part in enumerate(parts):
            if part[0] == "lit":
                if part[1]:
                    self.segs.append(Segment("lit", tokens=encode(part[1])))
            elif part[0] == "choice":
                seqs = [encode(o) for o in part[2]]
                self.segs.append(Segment("choice", key=part[1], trie=build_trie(seqs)))
            elif part[0] == "free":
                nxt = parts[i + 1]
                if nxt[0] != "lit" or not nxt[1].startswith('"'):
                    raise ValueError("a free string must be followed by a literal starting with a quote")
                self.segs.append(Segment("free", key=part[1], limit=part[2]))
        # A free string ends with the first token of the following literal, which must
        # start with the closing quote; keep that token out of the literal's rest.
        for i, seg in enumerate(self.segs):
            if seg.kind == "free":
                seg.close = self.segs[i + 1].tokens[0]
                if free_mask[seg.close]:
                    raise ValueError("closing token is allowed inside free text")
        self.free_mask = free_mask
        self.max_tokens = sum(_seg_tokens(s) for s in self.segs) + 1


def _merge_choice_delimiters(template: list[tuple]) -> list[list]:
    """Merge the first character of the literal after each choice into the options,
    so no option is a prefix of another ("0," vs "0.25,")."""
    parts = [list(p) for p in template]
    for i, part in enumerate(parts):
        if part[0] == "choice":
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if nxt is None or nxt[0] != "lit" or not nxt[1]:
                raise ValueError("a choice must be followed by a literal")
            part[2] = [opt + nxt[1][0] for opt in part[2]]
            nxt[1] = nxt[1][1:]
    return parts


def _seg_tokens(seg: Segment) -> int:
    if seg.kind == "lit":
        return len(seg.tokens)
    if seg.kind == "free":
        return seg.limit + 1
    return _depth(seg.trie or {})


def _depth(trie: dict) -> int:
    return 0 if not trie else 1 + max(_depth(t) for t in trie.values())


class _RowState:
    """A row's place in its grammar: the segment, the token within a literal, the subtrie of
    a choice's tokens so far (``{}`` outside a choice), the tokens of a free string so far."""

    __slots__ = ("seg", "pos", "node", "count", "done")

    def __init__(self) -> None:
        self.seg, self.pos, self.count, self.done = 0, 0, 0, False
        self.node: dict = {}


class SchemaLogitsProcessor:
    """Masks logits so that each row's continuation follows its grammar, then ends.

    Parameters:
        grammars: one grammar per batch row.
        eos_token_id: the token forced once a row's grammar is complete.
    """

    def __init__(self, grammars: Sequence[Grammar], eos_token_id: int) -> None:
        self.grammars = list(grammars)
        self.eos = eos_token_id
        self.states = [_RowState() for _ in grammars]
        self.prompt_len: int | None = None
        for g, st in zip(self.grammars, self.states, strict=True):
            self._enter(g, st)

    def _enter(self, g: Grammar, st: _RowState) -> None:
        while st.seg < len(g.segs):
            seg = g.segs[st.seg]
            st.pos, st.count, st.node = 0, 0, (seg.trie or {}) if seg.kind == "choice" else {}
            if seg.kind == "lit" and not seg.tokens:
                st.seg += 1
                continue
            return
        st.done = True

    def _advance(self, g: Grammar, st: _RowState, tok: int) -> None:
        if st.done:
            return
        seg = g.segs[st.seg]
        if seg.kind == "lit":
            st.pos += 1
            if st.pos >= len(seg.tokens):
                st.seg += 1
                self._enter(g, st)
        elif seg.kind == "choice":
            st.node = st.node[tok]
            if not st.node:
                st.seg += 1
                self._enter(g, st)
        elif tok == seg.close:
            st.seg += 1
            self._enter(g, st)
            lit = g.segs[st.seg]  # the closing literal; its first token is consumed
            st.pos = 1
            if st.pos >= len(lit.tokens):
                st.seg += 1
                self._enter(g, st)
        else:
            st.count += 1

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_len:
            last = input_ids[:, -1].tolist()
            for g, st, tok in zip(self.grammars, self.states, last, strict=True):
                self._advance(g, st, tok)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, (g, st) in enumerate(zip(self.grammars, self.states, strict=True)):
            if st.done:
                mask[row, self.eos] = True
                continue
            seg = g.segs[st.seg]
            if seg.kind == "lit":
                mask[row, seg.tokens[st.pos]] = True
            elif seg.kind == "choice":
                mask[row, list(st.node.keys())] = True
            else:
                if st.count < seg.limit:
                    mask[row] = g.free_mask.to(scores.device)
                mask[row, seg.close] = True
        return scores.masked_fill(~mask, float("-inf"))
