"""Plain data as tagged JSON, both ways: the one codec of the code sandbox (standard library only).

Three processes use it: the solution process encodes its return values, the checker (rewards/_harness.py) decodes
them and encodes the asserts' operand values, and the parent (rewards/code.py) decodes those. sandbox.py puts this
file's source in front of the harness's (the sandbox's interpreter runs with -I -S and cannot import rlkit);
rewards/code.py imports it. Decoding treats its input as untrusted: anything malformed, too deep or built to be
slow (keys crafted to collide in hash) becomes an `Opaque` value, which equals nothing and has no truth value.
"""

_type = type  # the builtin, whatever a name in the checker's namespace may later be bound to
_PLAIN = (int, float, str, bool, type(None))
MAX_DEPTH = 64  # deeper data is opaque
MAX_SAME_HASH = 32  # more elements of one set or dict sharing a hash: crafted collisions, opaque


class Opaque:
    """A value that could not travel as plain data: it equals nothing and has no truth value.

    >>> value = decode({"opaque": "Yes"})
    >>> value == value, value, bool([value])
    (False, <opaque Yes>, True)
    """

    def __init__(self, kind):
        self.kind = kind

    def __eq__(self, other):
        return False

    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError(f"opaque {self.kind} value has no truth value")

    def __repr__(self):
        return f"<opaque {self.kind}>"


def encode(value, depth=0):
    """A tagged JSON form of plain data; anything else (a class with a custom __eq__, say) is opaque.

    >>> encode({"a": (1, {2.5})}), encode(object())
    ({'dict': [['a', {'tuple': [1, {'set': [2.5]}]}]]}, {'opaque': 'object'})
    """
    kind = _type(value)
    if kind in _PLAIN:
        return value
    if depth > MAX_DEPTH:
        return {"opaque": "too deep"}
    if kind is list or kind is tuple:
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is set or kind is frozenset:
        return {"set": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is Opaque:
        return {"opaque": str(value.kind)[:100]}
    return {"opaque": kind.__name__}


def hash_spread(keys):
    """Whether `keys` can go into one set or dict in linear time: no more than MAX_SAME_HASH share a hash.
    (Colliding keys, e.g. multiples of 2**61 - 1, make each insertion compare with all the earlier ones.)"""
    hashes = sorted(map(hash, keys))  # O(n log n) whatever the values
    return all(hashes[i] != hashes[i + MAX_SAME_HASH] for i in range(len(hashes) - MAX_SAME_HASH))


def decode(value, depth=0):
    """encode's inverse, for untrusted data, in time linear in its size: what is malformed is opaque.

    >>> decode({"dict": [["a", {"tuple": [1, {"set": [2.5]}]}], [3, {"bytes": "6869"}]]})
    {'a': (1, {2.5}), 3: b'hi'}
    >>> decode({"set": [{"list": [1]}]}), decode({"list": 1})
    (<opaque malformed>, <opaque malformed>)
    """
    if value is None or _type(value) in (int, float, str, bool):
        return value
    if _type(value) is not dict or len(value) != 1 or depth > MAX_DEPTH + 1:
        return Opaque("malformed")
    (tag, body), = value.items()
    try:
        if tag in ("list", "tuple"):
            items = [decode(v, depth + 1) for v in body]
            return list(items) if tag == "list" else tuple(items)
        if tag == "set":
            items = [decode(v, depth + 1) for v in body]
            return set(items) if hash_spread(items) else Opaque("hash-colliding set")
        if tag == "dict":
            pairs = [(decode(k, depth + 1), decode(v, depth + 1)) for k, v in body]
            return dict(pairs) if hash_spread([k for k, _ in pairs]) else Opaque("hash-colliding dict")
        if tag == "bytes":
            return bytes.fromhex(body)
        if tag == "complex":
            return complex(*body)
    except (TypeError, ValueError):  # e.g. an unhashable item in a set, a body of the wrong type
        return Opaque("malformed")
    return Opaque(str(body)[:100] if tag == "opaque" else "malformed")
