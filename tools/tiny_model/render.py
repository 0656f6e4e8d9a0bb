"""Renders task conversations through the real Qwen3-Next Thinking chat template and turns them
into training pieces: (text, trained?) in order, split exactly where a server would split a
prompt from what the model generates (after the generation prompt `<|im_start|>assistant\\n<think>\\n`,
through `<|im_end|>`)."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tasks import Example

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_SOURCE = REPO / "tests/fixtures/chat_templates/tokenizer_config.thinking.json"


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' `tojson`: json.dumps with its defaults (", " and ": " separators, no ASCII escaping)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def load_template(path: Path = TEMPLATE_SOURCE) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    return env.from_string(json.loads(path.read_text())["chat_template"])


class Renderer:
    def __init__(self, template: jinja2.Template | None = None):
        self.template = template or load_template()

    def render(self, messages, tools=None, add_generation_prompt=False) -> str:
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def prompt(self, ex: Example, upto: int) -> str:
        """The prompt a server renders to generate assistant message `upto`."""
        return self.render(ex.messages[:upto], ex.tools, add_generation_prompt=True)

    def completion(self, ex: Example, k: int) -> str:
        """What the model generates for assistant message k, through `<|im_end|>`."""
        p = self.prompt(ex, k)
        full = self.render(ex.messages[: k + 1], ex.tools)
        assert full.startswith(p), (p, full)
        out = full[len(p):]
        assert out.endswith("<|im_end|>\n"), out
        return out[: -1]

    def pieces(self, ex: Example, rng: random.Random) -> list[tuple[str, bool]]:
        """Training pieces. Every assistant message after the last user question is trained; a
        tool-call turn is kept with its reasoning in the history half of the time, and otherwise
        (as a client that drops `reasoning_content` sends it back) the answer turn is trained
        alone after a history without it."""
        trained = [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        trained = [i for i in trained if i > last_user]
        if len(trained) > 1 and rng.random() < 0.5:
            ex = copy.deepcopy(ex)
            for i in trained[:-1]:
                ex.messages[i].pop("reasoning_content", None)
            trained = trained[-1:]
        out, done = [], ""
        for k in trained:
            p = self.prompt(ex, k)
            assert p.startswith(done), (done, p)
            out.append((p[len(done):], False))
            c = self.completion(ex, k)
            out.append((c, True))
            done = p + c
        return out
