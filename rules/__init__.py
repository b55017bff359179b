"""The rules core: what every component of tracecode must agree on, written once.

    insured     insured ids: the one normalisation and validation (GB 11643 check character)
    pseudonym   keyed pseudonyms of insured ids (HMAC under the deployment's key)
    text        free text: the characters no stored or logged field may hold
    cells       spreadsheet cells: formula neutralisation for every CSV and XLSX writer
    packing     the packed forms of the store's layout (codes, times, pseudonyms and digests),
                with their Lua twin in server/store/lua/_state.lua

The server, the leads engine, the console and the clients import these; none restates them.

May import: the standard library only (and, later, the codec). Never the server, the clients,
the console, the leads engine, grpc or redis.
"""
