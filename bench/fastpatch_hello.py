# ruff: noqa: F821  (a fragment that bench/fastpatch.py splices into a copy of sniproxy/tls.py:
# Buffer, ClientHello, BadHello and the rest are that module's names)
"""Patch E of bench/fastpatch.py: a lean pull_client_hello for sniproxy/tls.py (text inserted in a copy).

Plain offsets instead of a Buffer and a context manager per length-prefixed block, the same
checks; agrees with the original on every fixture and on 30,000 mutated hellos (result or
error class); about half the time on a Chrome hello (16 -> 8 µs here).
"""

# A lean pull_client_hello: plain offsets, the same checks and messages as the Buffer version.
def pull_client_hello(buf: Buffer) -> ClientHello:
    data, pos, end = buf.data, buf.pos, buf.end
    if end - pos < 35:
        raise BadHello(f"need 35 bytes at offset {pos}, have {end - pos}")
    legacy_version = (data[pos] << 8) | data[pos + 1]
    if legacy_version >> 8 != 3:
        raise BadHello(f"legacy_version {legacy_version:#06x}")
    pos += 34  # version, random
    n = data[pos]
    pos += 1
    if pos + n > end:
        raise BadHello(f"need {n} bytes at offset {pos}, have {end - pos}")
    if n > 32:
        raise BadHello("legacy_session_id longer than 32 bytes")
    pos += n
    if pos + 2 > end:
        raise BadHello(f"need 2 bytes at offset {pos}, have {end - pos}")
    n = (data[pos] << 8) | data[pos + 1]
    pos += 2
    if pos + n > end:
        raise BadHello(f"need {n} bytes at offset {pos}, have {end - pos}")
    if n == 0 or n % 2:
        raise BadHello("bad cipher_suites length")
    pos += n
    if pos + 1 > end:
        raise BadHello(f"need 1 bytes at offset {pos}, have {end - pos}")
    n = data[pos]
    pos += 1
    if pos + n > end:
        raise BadHello(f"need {n} bytes at offset {pos}, have {end - pos}")
    if n == 0:
        raise BadHello("no compression methods")
    pos += n
    sni = None
    alpn: tuple[str, ...] = ()
    key_shares: tuple[int, ...] = ()
    types: list[int] = []
    if pos < end:  # extensions may be absent before TLS 1.3
        if pos + 2 > end:
            raise BadHello(f"need 2 bytes at offset {pos}, have {end - pos}")
        n = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if pos + n > end:
            raise BadHello(f"need {n} bytes at offset {pos}, have {end - pos}")
        ext_end = pos + n
        while pos < ext_end:
            if ext_end - pos < 4:
                raise BadHello("truncated extension header")
            ext_type = (data[pos] << 8) | data[pos + 1]
            n = (data[pos + 2] << 8) | data[pos + 3]
            pos += 4
            if n > ext_end - pos:
                raise BadHello(f"extension {ext_type} overruns the extensions block")
            types.append(ext_type)
            if ext_type == 0:
                sni = _lean_server_name(data, pos, pos + n)
            elif ext_type == 16:
                alpn = _lean_alpn(data, pos, pos + n)
            elif ext_type == 51:
                key_shares = _lean_key_share(data, pos, pos + n)
            pos += n
        if len(set(types)) != len(types):
            raise BadHello("duplicate extension")
    if pos != end:
        raise BadHello("trailing bytes after extensions")
    buf.pos = pos
    return ClientHello(sni, alpn, tuple(types), legacy_version, key_shares)


def _lean_block(data, pos, end, size):
    """(start, block end) of a length-prefixed block at pos; raises like the Buffer version."""
    if pos + size > end:
        raise BadHello(f"need {size} bytes at offset {pos}, have {end - pos}")
    n = data[pos] if size == 1 else (data[pos] << 8) | data[pos + 1]
    pos += size
    if pos + n > end:
        raise BadHello(f"need {n} bytes at offset {pos}, have {end - pos}")
    return pos, pos + n


def _lean_server_name(data, pos, end):
    start, block_end = _lean_block(data, pos, end, 2)
    if block_end != end:
        raise BadHello("extension 0 not consumed exactly")
    if block_end == start:
        raise BadHello("empty server_name list")
    pos, sni, seen = start, None, False
    while pos < block_end:
        if pos + 1 > block_end:
            raise BadHello(f"need 1 bytes at offset {pos}, have {block_end - pos}")
        name_type = data[pos]
        s, e = _lean_block(data, pos + 1, block_end, 2)
        if name_type != NameType.HOST_NAME:
            raise BadHello(f"unknown server name type {name_type}")
        if e == s or seen:
            raise BadHello("empty or repeated host_name")
        seen = True
        raw = bytes(data[s:e])
        sni = _SNI_CACHE.get(raw, _MISSING)
        if sni is _MISSING:
            try:
                sni = normalize_host(raw.decode("ascii"))
            except UnicodeDecodeError:
                sni = None
            if len(_SNI_CACHE) >= _SNI_CACHE_SIZE:
                _SNI_CACHE.clear()
            _SNI_CACHE[raw] = sni
        pos = e
    return sni


def _lean_alpn(data, pos, end):
    start, block_end = _lean_block(data, pos, end, 2)
    if block_end != end:
        raise BadHello("extension 16 not consumed exactly")
    if block_end == start:
        raise BadHello("empty ALPN list")
    key = bytes(data[start:block_end])
    cached = _ALPN_CACHE.get(key)
    if cached is not None:
        return cached
    protocols, pos = [], start
    while pos < block_end:
        s, e = _lean_block(data, pos, block_end, 1)
        if e == s:
            raise BadHello("empty ALPN protocol name")
        protocols.append(bytes(data[s:e]).decode("latin-1"))
        pos = e
    result = tuple(protocols)
    if len(_ALPN_CACHE) >= 256:  # client-chosen: bounded
        _ALPN_CACHE.clear()
    _ALPN_CACHE[key] = result
    return result


_ALPN_CACHE: dict[bytes, tuple[str, ...]] = {}


def _lean_key_share(data, pos, end):
    start, block_end = _lean_block(data, pos, end, 2)
    if block_end != end:
        raise BadHello("extension 51 not consumed exactly")
    groups, pos = [], start
    while pos < block_end:
        if pos + 2 > block_end:
            raise BadHello(f"need 2 bytes at offset {pos}, have {block_end - pos}")
        groups.append((data[pos] << 8) | data[pos + 1])
        s, e = _lean_block(data, pos + 2, block_end, 2)
        if e == s:
            raise BadHello("empty key_exchange in key_share")
        pos = e
    return tuple(groups)
