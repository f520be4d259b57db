"""A minimal OpenAI-style server that answers at once: the upstream for measuring how many
requests per second one router process can proxy (no model in the way).

    python benchmarks/stub_openai.py PORT [NUM_CHUNKS]
"""

from __future__ import annotations

import json
import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()
NUM_CHUNKS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
CHUNK = "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [
    {"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}) + "\n\n"


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/chat/completions")
async def chat() -> StreamingResponse:
    async def body():
        for _ in range(NUM_CHUNKS):
            yield CHUNK
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
