"""Answer text as it is decoded, in pieces that join to exactly the final answer.

Decoding token by token and printing each token's own text breaks words that span tokens (and
multi-byte characters split across byte tokens), so each step decodes the whole answer so far and
hands on only what is new and settled: nothing that ends in an incomplete character (U+FFFD), no
leading whitespace, and trailing whitespace only once something follows it (the final answer is
stripped). `"".join(pieces) == final text` always holds.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, on_text=None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.sent = ""  # what on_text has received so far

    def push(self, token_id: int) -> str:
        """Add one token; returns (and hands to on_text) the new settled text, possibly ''."""
        self.tokens.append(int(token_id))
        text = self.text()
        if text.endswith("\ufffd"):  # a character split across byte tokens: wait for the rest
            return ""
        return self._send(text.rstrip())

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def finish(self) -> str:
        """Whatever was held back; afterwards the pieces join to the final (stripped) answer."""
        return self._send(self.text().strip())

    def _send(self, settled: str) -> str:
        if not settled.startswith(self.sent):  # a tokenizer that rewrites earlier text: resend nothing
            return ""
        piece = settled[len(self.sent):]
        if piece:
            self.sent = settled
            if self.on_text is not None:
                self.on_text(piece)
        return piece
