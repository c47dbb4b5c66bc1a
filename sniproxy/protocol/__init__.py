"""Sans-I/O parsers: bytes in, a result or NEED_DATA out; bad input raises one typed error."""
