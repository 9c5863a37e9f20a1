"""A chat-template worker process (``python -m lmforge.serve.template_worker MEMORY_MB MAX_CHARS``).

Reads JSON lines on stdin: first ``{"source", "special_tokens"}`` (answered ``{"ready": true}``
or ``{"error"}``), then ``{"messages", "add_generation_prompt"}`` requests, each answered by
one line, ``{"text"}`` or ``{"error"}``. Its address space is limited to what it holds after
start-up plus MEMORY_MB, so a template that allocates without bound gets a MemoryError
here. It exits when stdin closes (the server stopped, or was killed).
"""

from __future__ import annotations

import json
import resource
import sys


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    memory_mb, max_chars = int(argv[0]), int(argv[1])
    from lmforge.errors import LmforgeError
    from lmforge.tokenizer.chat import ChatTemplate

    init = sys.stdin.readline()
    if not init:
        return 0
    try:
        spec = json.loads(init)
        template = ChatTemplate(spec["source"], spec.get("special_tokens") or {})
    except (LmforgeError, ValueError, KeyError, TypeError) as e:
        _reply({"error": f"the chat template cannot be used: {e}"})
        return 1
    try:  # Linux; elsewhere the worker runs without a memory limit (the time limit still holds)
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * resource.getpagesize()
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = held + (memory_mb << 20)
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass
    _reply({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            text = template.render(req["messages"], add_generation_prompt=bool(req.get("add_generation_prompt", True)))
            if len(text) > max_chars:
                _reply({"error": f"the chat template produced {len(text):,} characters; the limit is {max_chars:,}"})
            else:
                _reply({"text": text})
        except LmforgeError as e:
            _reply({"error": str(e)})
        except MemoryError:
            _reply({"error": f"the chat template needed more than {memory_mb} MB of memory"})
        except Exception as e:  # noqa: BLE001 - a bad request line; the worker keeps serving
            _reply({"error": f"the chat template failed: {type(e).__name__}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
