# -*- test-case-name: tests.test_config -*-
"""
``cmd`` and ``cmdStop`` blocks into argv, the way llama-swap splits them (reference section 1.5).
"""

from __future__ import annotations


def split_command(text: str) -> list[str]:
    """
    Split a ``cmd``/``cmdStop`` block into argv the way llama-swap does (reference section 1.5).

    Lines whose first non-blank character is ``#`` are dropped; a trailing ``\\`` joins lines; the
    rest is split into POSIX shell words (quotes and backslash escapes; no expansion, globbing or
    pipes). An unterminated quote is tolerated: the rest of the text ends the word. Unlike
    llama-swap, ``\\r`` is whitespace, so CRLF files do not leak it into arguments.
    """
    lines = []
    for line in text.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    text = "\n".join(lines)
    words: list[str] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n\r":
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
            i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
                in_word = True
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            word.append(text[i + 1:end])
            in_word, i = True, end + 1
        elif c == '"':
            in_word, i = True, i + 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        word.append(text[i + 1])
                    i += 2
                else:
                    word.append(text[i])
                    i += 1
            i += 1
        else:
            word.append(c)
            in_word, i = True, i + 1
    if in_word:
        words.append("".join(word))
    return words


def drop_comment_lines(text: str) -> str:
    """
    ``text`` without the lines whose first non-blank character is ``#``.
    """
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith("#"))
