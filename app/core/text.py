"""Control characters in text that comes from outside: found, or escaped for a log line."""

import unicodedata


def is_control_character(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def has_control_character(text: str) -> bool:
    return any(is_control_character(char) for char in text)


def escape_control_characters(text: str) -> str:
    """`text` with each control character (a newline too) written as its escape, so that one
    log line can never look like two."""
    if not has_control_character(text):
        return text
    return "".join(char.encode("unicode_escape").decode() if is_control_character(char) else char for char in text)
