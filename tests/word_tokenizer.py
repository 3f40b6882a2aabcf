"""A stand-in tokenizer for prompt-budget tests: one token per whitespace-separated word; the 'chat template' joins
role and content, and the generation prompt is one more word."""
from __future__ import annotations


class WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()

    def decode(self, ids: list[str], skip_special_tokens: bool = False) -> str:
        return " ".join(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[str]:
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return self.encode(text + (" <assistant>" if add_generation_prompt else ""))
