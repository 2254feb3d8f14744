"""A repo's chat template rendered under a time, memory and output-size limit.

A chat template is a Jinja program from the repo. transformers renders it in Jinja's
sandbox (no file, network or attribute escape), but the sandbox has no CPU or memory cap: a
template that loops, or builds a 50 MB string, held one request for 14 minutes and 3.3 GB.
So here a template is refused above ``MAX_TEMPLATE_CHARS``, and rendered with transformers'
own renderer (``render_jinja_template``, so the text is exactly what ``apply_chat_template``
gives) in a child Python process that:

- gets ``RENDER_TIMEOUT_S`` of wall time for every conversation of a check at once, and is
  killed after it;
- may address at most ``RENDER_MEMORY_BYTES`` (``RLIMIT_AS``, set before the template is read);
- returns at most ``MAX_RENDERED_CHARS`` per conversation;
- starts with an environment of ``PATH``/``PYTHONPATH``/locale only: no token reaches it.

One child per call (~1 s to import the renderer), so callers render all their texts at once.
POSIX only (``resource``); not here: tokenizing (``tokenizer``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lorafid.errors import ChatTemplateError

MAX_TEMPLATE_CHARS = 100_000  # real chat templates are 1-20 kB (tool-calling ones the largest)
MAX_RENDERED_CHARS = 100_000  # per conversation: a short prompt in a template is a few hundred characters
RENDER_TIMEOUT_S = 20.0  # every conversation of one check; real templates take milliseconds
RENDER_MEMORY_BYTES = 1 << 30  # the child imports jinja2 and transformers' renderer in ~0.2 GB
_ENVIRONMENT = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "SYSTEMROOT")

# The child: limits first, then the renderer; one JSON object in, one out.
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
job = json.load(sys.stdin)
from transformers.utils.chat_template_utils import render_jinja_template
try:
    texts, _ = render_jinja_template(
        conversations=job["conversations"], chat_template=job["template"], add_generation_prompt=True,
        **job["variables"]
    )
except MemoryError:
    print(json.dumps({{"error": "memory"}})); sys.exit(0)
except Exception as e:
    print(json.dumps({{"error": "template", "detail": type(e).__name__ + ": " + str(e)[:200]}})); sys.exit(0)
long = [i for i, t in enumerate(texts) if len(t) > job["max_chars"]]
print(json.dumps({{"error": "size", "index": long[0]}} if long else {{"texts": texts}}))
"""


def render_user_turns(template: str, texts: Sequence[str], variables: Mapping[str, Any]) -> list[str]:
    """Each text as one user turn through ``template`` with the assistant's turn opened, rendered
    in a bounded child process. ``variables``: the tokenizer's special tokens (``bos_token``, ...).

    Raises:
        ChatTemplateError: the template is too long, takes too long or too much memory, renders
            a text longer than ``MAX_RENDERED_CHARS``, or fails (its own error, shortened).
    """
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(
            f"The fine-tune's chat template is {len(template):,} characters, above the {MAX_TEMPLATE_CHARS:,} "
            "lorafid renders (real ones are a few kB); run without the chat template."
        )
    if not texts:
        return []
    job = {
        "template": template,
        "conversations": [[{"role": "user", "content": t}] for t in texts],
        "variables": {k: v for k, v in variables.items() if isinstance(v, (str, list))},
        "max_chars": MAX_RENDERED_CHARS,
    }
    code = _CHILD.format(memory=RENDER_MEMORY_BYTES, cpu=int(RENDER_TIMEOUT_S) + 1)
    env = {k: os.environ[k] for k in _ENVIRONMENT if k in os.environ}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ChatTemplateError(
            f"The fine-tune's chat template did not finish rendering {len(texts)} prompt(s) within "
            f"{RENDER_TIMEOUT_S:g} s (it loops or builds a huge text); run without the chat template."
        ) from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = {"error": "memory" if done.returncode else "crash"}
    error = answer.get("error")
    if error == "size":
        raise ChatTemplateError(
            f"The fine-tune's chat template made prompt {answer['index'] + 1} longer than {MAX_RENDERED_CHARS:,} "
            "characters; run without the chat template."
        )
    if error == "template":
        raise ChatTemplateError(
            f"The fine-tune's chat template failed to render a user turn ({answer.get('detail', '')}); run without "
            "the chat template."
        )
    if error:
        raise ChatTemplateError(
            "The fine-tune's chat template could not be rendered within this server's memory and time limits "
            f"({RENDER_MEMORY_BYTES >> 20} MiB, {RENDER_TIMEOUT_S:g} s); run without the chat template."
        )
    rendered = answer.get("texts")
    if not isinstance(rendered, list) or len(rendered) != len(texts) or not all(isinstance(t, str) for t in rendered):
        raise ChatTemplateError("The chat template's renderer answered something unexpected; run without it.")
    return rendered
