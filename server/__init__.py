"""The tracecode server, in rooms drawn by what each may import (import-linter checks them,
pyproject.toml):

    api/     the only code that speaks gRPC or uses the generated stubs: servicers, bulk stream,
             proto conversion, status mapping, interceptors, auth, the gRPC server and health
    store/   the only code that speaks Redis: connections, cluster routing and two-phase commit,
             error mapping, keys, Lua scripts, the embedded redis-server
    the plain modules, which import neither: verifier (the rules), issuance, verdicts, errors,
             config, logs, metrics, priority, pseudonym, failpoints, and app / workers (which
             assemble and run the rest)

A settlement's path: api/servicer.py -> verifier.py -> tracecode.codec -> store/store.py ->
store/lua/verify.lua.
"""
