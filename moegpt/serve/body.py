"""Request bodies a client controls, read within limits: at most ``max_bytes`` (413 past it, checked on
Content-Length before reading and again while the body streams in), and JSON of at most
``MAX_JSON_DEPTH`` levels that Python's parser can take (400 otherwise). Whatever bytes a client sends,
the answer is an OpenAI error, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from moegpt.serve.errors import APIError, bad_request

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # a 256k-token prompt as a list of ids fits (~2 MiB)
MAX_JSON_DEPTH = 32  # OpenAI's deepest field (messages[i].content[j].text) is 4 levels down


def too_large(size: int | str, max_bytes: int) -> APIError:
    return APIError(413, f"the request body ({size} bytes) is larger than the limit of {max_bytes} bytes",
                    code="request_too_large")


async def read_body(headers, chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body from ``chunks`` (Starlette's ``request.stream()``); 413 once it passes ``max_bytes``."""
    declared = headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise too_large(int(declared), max_bytes)  # refused before a byte of it is read
    body, size = bytearray(), 0
    async for chunk in chunks:  # chunked bodies have no Content-Length: count as they come
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"over {max_bytes}", max_bytes)
        body += chunk
    return bytes(body)


def load_json(body: bytes) -> object:
    """``json.loads`` with its failures as 400s: bad syntax or UTF-8, nesting past ``MAX_JSON_DEPTH`` (the
    parser's recursion error on deeper input), integers past Python's digit limit."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise bad_request(f"the request body is JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise bad_request(f"the request body has a value this server cannot read ({str(e).split(':')[0]})") from None
    if depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body is JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def depth(value: object) -> int:
    """Levels of arrays and objects in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_JSON_DEPTH:
            break  # deep enough to refuse: no need to walk the rest
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
