"""
The same hello world for the peers that bench/run.py --peers measures:
a WSGI app (gunicorn) and an ASGI app (uvicorn, granian), answering GET /
with a small JSON body, as txcluster's demo does.
"""

import json
import os

_BODY = json.dumps({"hello": "world", "pid": os.getpid()}).encode()
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]


def wsgi(environ, start_response):
    start_response("200 OK", [(k.decode(), v.decode()) for k, v in _HEADERS])
    return [_BODY]


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
