"""How long the HTTP servers (`kvmesh serve`, `kvmesh router`) keep an idle connection.

uvicorn's default is 5 s. Longer than clients keep theirs (httpx 5 s, aiohttp 15 s, the
router's pool to its instances), so the client always closes first: with equal timeouts a
client can send a request on a connection the server is closing that instant and get a
connection error (one request in about 400 did so in benchmarks/slo.py).
"""

HTTP_KEEP_ALIVE_S = 75
