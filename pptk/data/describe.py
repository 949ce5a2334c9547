# How an error names a value of the wrong type: by JSON's name for it (what the user sees in the file) and a preview.


def json_type(value: object) -> str:
    """JSON's name for a parsed value's type: object, array, string, number, boolean or null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def json_preview(value: object, limit: int = 40) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
