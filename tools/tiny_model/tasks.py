"""Task families for the bundled tiny Qwen3-Next: conversations with checkable answers.

Every generator takes a `random.Random` and returns an `Example`: the chat messages (OpenAI
form, assistant turns with `reasoning_content`), the tools declared (or None), the family name and
what a correct final answer must contain. The reasoning works every problem in small local steps
(one column, one letter, one lookup at a time): a model of a few million parameters cannot carry
a multi-digit sum in its head, but it can copy a digit that a label points at.

Held-out split: a question whose hash falls in bucket 0 of 16 is reserved for evaluation
(`split="eval"`); training draws only from the other buckets, so no evaluated question was seen.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass, field

PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


@dataclass
class Example:
    family: str
    messages: list
    tools: list | None = None
    # What the final assistant turn must say: an exact string for `content`, and for tool-call
    # turns the expected call. Checked by eval.py against what qnext generates.
    answer: str | None = None
    call: dict | None = None
    extra: dict = field(default_factory=dict)


def bucket(question: str) -> int:
    return hashlib.sha256(question.encode()).digest()[0] % 16


def in_split(question: str, split: str) -> bool:
    return (bucket(question) == 0) == (split == "eval")


# ---------------------------------------------------------------- arithmetic, worked by column

def digits_line(n: int) -> str:
    ds = str(n)[::-1]
    return f"{n}: " + ", ".join(f"{PLACES[i]} {d}" for i, d in enumerate(ds)) + "."


def read_back(written: list[int]) -> tuple[str, int]:
    """The written digits (ones first) read from the highest place down, and their value."""
    s = "".join(str(d) for d in reversed(written))
    return f"Reading the written digits from {PLACES[len(written) - 1]} down to ones: {s}.", int(s)


def close_columns(lines: list[str], written: list[int], carry: int, expected: int) -> tuple[list[str], int]:
    """The last carry as a column of its own, then the digits read back (and checked)."""
    if carry:
        lines.append(f"{PLACES[len(written)]}: carry {carry}. Write {carry}.")
        written.append(carry)
    text, value = read_back(written)
    lines.append(text)
    assert value == expected
    return lines, value


def add_steps(a: int, b: int) -> tuple[list[str], int]:
    lines = [f"I add {a} + {b} column by column, starting from the ones.", digits_line(a), digits_line(b)]
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    carry, written = 0, []
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{PLACES[i]}: {x} + {y} + {carry} = {s}. Write {s % 10}, carry {s // 10}.")
        written.append(s % 10)
        carry = s // 10
    return close_columns(lines, written, carry, a + b)


def sub_steps(a: int, b: int) -> tuple[list[str], int]:
    lines = [f"I subtract {a} - {b} column by column, starting from the ones.", digits_line(a), digits_line(b)]
    da, db = str(a)[::-1], str(b)[::-1]
    borrow, written = 0, []
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        if x - y - borrow >= 0:
            d = x - y - borrow
            lines.append(f"{PLACES[i]}: {x} - {y} - {borrow} = {d}. Write {d}, borrow 0.")
            borrow = 0
        else:
            d = 10 + x - y - borrow
            lines.append(f"{PLACES[i]}: {x} - {y} - {borrow} is negative, so 1{x} - {y} - {borrow} = {d}. "
                         f"Write {d}, borrow 1.")
            borrow = 1
        written.append(d)
    text, value = read_back(written)
    lines.append(text)
    assert value == a - b
    return lines, value


def mul1_steps(a: int, d: int) -> tuple[list[str], int]:
    """a times a single digit d."""
    lines = [f"I multiply each digit of {a} by {d}, starting from the ones.", digits_line(a)]
    da = str(a)[::-1]
    carry, written = 0, []
    for i, c in enumerate(da):
        p = int(c) * d
        s = p + carry
        lines.append(f"{PLACES[i]}: {c} * {d} = {p}, {p} + {carry} = {s}. Write {s % 10}, carry {s // 10}.")
        written.append(s % 10)
        carry = s // 10
    return close_columns(lines, written, carry, a * d)


def mul_steps(a: int, b: int) -> tuple[list[str], int]:
    if b < 10:
        lines, v = mul1_steps(a, b)
        return lines + [f"So {a} * {b} = {v}."], v
    tens, ones = divmod(b, 10)
    lines = [f"I split {b} into {tens}0 + {ones} and multiply {a} by each part.", f"First {a} * {ones}."]
    l1, p1 = mul1_steps(a, ones)
    lines += l1 + [f"So {a} * {ones} = {p1}.", f"Next {a} * {tens}."]
    l2, p2 = mul1_steps(a, tens)
    p2 *= 10
    lines += l2 + [f"So {a} * {tens} = {p2 // 10}, and {a} * {tens}0 = {p2}.", f"Now I add {p1} + {p2}."]
    l3, v = add_steps(p1, p2)
    lines += l3 + [f"So {a} * {b} = {v}."]
    assert v == a * b
    return lines, v


OPS = {"+": ("plus", add_steps), "-": ("minus", sub_steps), "*": ("times", mul_steps)}


def arith_operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "+":
        return rng.randint(10, 9999), rng.randint(10, 9999)
    if op == "-":
        a = rng.randint(20, 9999)
        return a, rng.randint(10, a - 1)
    if rng.random() < 0.35:
        return rng.randint(10, 999), rng.randint(2, 9)
    return rng.randint(10, 99), rng.randint(10, 99)


def arith_question(rng: random.Random, a: int, op: str, b: int) -> str:
    word = OPS[op][0]
    return rng.choice([
        f"What is {a} {op} {b}?", f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?",
        f"Calculate {a} {word} {b}.", f"What's {a} {word} {b}?", f"Please work out {a} {op} {b}.",
    ])


def arithmetic(rng: random.Random, op: str) -> tuple[str, str, str, int]:
    a, b = arith_operands(rng, op)
    q = arith_question(rng, a, op, b)
    lines, v = OPS[op][1](a, b)
    if op != "*":
        lines = lines + [f"So {a} {op} {b} = {v}."]
    return q, "\n".join(lines), f"{a} {op} {b} = {v}", v


# ---------------------------------------------------------------- unit conversions

UNITS = [  # (from singular, from plural, to plural, factor)
    ("kilometre", "kilometres", "metres", 1000), ("metre", "metres", "centimetres", 100),
    ("kilogram", "kilograms", "grams", 1000), ("litre", "litres", "millilitres", 1000),
    ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24), ("week", "weeks", "days", 7), ("foot", "feet", "inches", 12),
    ("year", "years", "months", 12),
]


def conversion(rng: random.Random) -> tuple[str, str, str, int]:
    one, many, to, f = rng.choice(UNITS)
    q = rng.randint(2, 99)
    question = rng.choice([f"Convert {q} {many} to {to}.", f"How many {to} are in {q} {many}?",
                           f"What is {q} {many} in {to}?"])
    lines = [f"1 {one} is {f} {to}, so {q} {many} is {q} * {f} {to}."]
    if f in (10, 100, 1000):
        zeros = len(str(f)) - 1
        v = q * f
        lines.append(f"Multiplying by {f} appends {zeros} zeros: {v}.")
    elif f % 10 == 0:
        steps, v = mul1_steps(q, f // 10)
        v *= 10
        lines += steps + [f"So {q} * {f // 10} = {v // 10}, and {q} * {f} = {v}."]
    else:
        steps, v = mul_steps(q, f)
        lines += steps
    lines.append(f"So {q} {many} is {v} {to}.")
    return question, "\n".join(lines), f"{q} {many} = {v} {to}", v


# ---------------------------------------------------------------- string tasks on capital letters

def letters(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> str:
    n = rng.randint(lo, hi)
    if distinct:
        return "".join(rng.sample(string.ascii_uppercase, n))
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))


def numbered(s: str) -> str:
    return ", ".join(f"{i + 1} {c}" for i, c in enumerate(s))


def reverse_task(rng: random.Random) -> tuple[str, str, str]:
    s = letters(rng, 3, 7)
    q = rng.choice([f"Reverse the string {s}.", f"What is {s} written backwards?", f"Reverse the letters of {s}."])
    r = s[::-1]
    lines = [f"The letters of {s}, numbered: {numbered(s)}.", f"There are {len(s)} letters.",
             "From the last to the first: " + ", ".join(f"{len(s) - i} {c}" for i, c in enumerate(r)) + ".",
             f"Joined: {r}."]
    return q, "\n".join(lines), r


def count_task(rng: random.Random) -> tuple[str, str, str, int]:
    s = letters(rng, 3, 9)
    c = rng.choice(s) if rng.random() < 0.85 else rng.choice(string.ascii_uppercase)
    if rng.random() < 0.5:  # more repeats
        s = "".join(c if rng.random() < 0.3 else x for x in s)
    q = rng.choice([f"How many times does the letter {c} appear in {s}?", f"Count the letter {c} in {s}.",
                    f"How many {c}s are there in {s}?"])
    n, steps = 0, []
    for x in s:
        if x == c:
            n += 1
            steps.append(f"{x} yes, {n}")
        else:
            steps.append(f"{x} no, {n}")
    lines = [f"I go through {s} letter by letter and count {c}.", ". ".join(steps) + ".", f"The count is {n}."]
    times = "time" if n == 1 else "times"
    return q, "\n".join(lines), f"The letter {c} appears {n} {times} in {s}.", n


def sort_task(rng: random.Random) -> tuple[str, str, str]:
    s = letters(rng, 3, 7, distinct=True)
    q = rng.choice([f"Sort the letters of {s} in alphabetical order.", f"Sort {s} alphabetically.",
                    f"Put the letters {s} in alphabetical order."])
    r = "".join(sorted(s))
    lines = [f"The letters of {s}: " + ", ".join(s) + ".", "In alphabetical order: " + ", ".join(r) + ".",
             f"Joined: {r}."]
    return q, "\n".join(lines), r


# ---------------------------------------------------------------- tools (Hermes format)

def _tool(name, description, props, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


TOOLS = {
    "get_weather": _tool("get_weather", "Get the current weather in a city.",
                         {"city": {"type": "string", "description": "The city name."}}, ["city"]),
    "get_time": _tool("get_time", "Get the current local time in a city.",
                      {"city": {"type": "string", "description": "The city name."}}, ["city"]),
    "get_exchange_rate": _tool("get_exchange_rate", "Get the exchange rate between two currencies.",
                               {"base": {"type": "string", "description": "Currency code to convert from."},
                                "quote": {"type": "string", "description": "Currency code to convert to."}},
                               ["base", "quote"]),
    "calculator": _tool("calculator", "Evaluate an arithmetic expression exactly.",
                        {"expression": {"type": "string", "description": "The expression, e.g. 12 * 34."}},
                        ["expression"]),
}

CITIES = ["Paris", "Oslo", "Tokyo", "Lima", "Cairo", "Berlin", "Madrid", "Rome", "Vienna", "Dublin", "Lisbon",
          "Prague", "Warsaw", "Athens", "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Denver",
          "Nairobi", "Lagos", "Santiago", "Bogota", "Quito", "Helsinki", "Zurich", "Geneva", "Munich",
          "Hamburg", "Milan", "Naples", "Porto", "Kyoto", "Osaka", "Hanoi", "Manila", "Jakarta", "Perth"]
CONDITIONS = ["sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "clear"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "INR"]


def tool_task(rng: random.Random) -> tuple[str, str, dict, dict, str, str]:
    """(question, first reasoning, call, tool result, second reasoning, final answer)."""
    kind = rng.choice(["get_weather", "get_time", "get_exchange_rate", "calculator"])
    if kind == "get_weather":
        city = rng.choice(CITIES)
        q = rng.choice([f"What's the weather in {city}?", f"How is the weather in {city} right now?",
                        f"Is it warm in {city} today?"])
        args = {"city": city}
        t, cond = rng.randint(-15, 38), rng.choice(CONDITIONS)
        result = {"city": city, "temperature_c": t, "condition": cond}
        r1 = f"The user asks about the weather in {city}. I will call get_weather with city {city}."
        r2 = f"The tool says {city} has {t} degrees Celsius and it is {cond}."
        final = f"It is {t} °C and {cond} in {city} right now."
    elif kind == "get_time":
        city = rng.choice(CITIES)
        q = rng.choice([f"What time is it in {city}?", f"Tell me the local time in {city}.",
                        f"What's the current time in {city}?"])
        args = {"city": city}
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        result = {"city": city, "time": f"{hh:02d}:{mm:02d}"}
        r1 = f"The user wants the local time in {city}. I will call get_time with city {city}."
        r2 = f"The tool says it is {hh:02d}:{mm:02d} in {city}."
        final = f"It is {hh:02d}:{mm:02d} in {city}."
    elif kind == "get_exchange_rate":
        base, quote = rng.sample(CURRENCIES, 2)
        q = rng.choice([f"How many {quote} is one {base}?", f"What is the exchange rate from {base} to {quote}?",
                        f"Convert 1 {base} to {quote}."])
        args = {"base": base, "quote": quote}
        rate = round(rng.uniform(0.01, 150), rng.choice([2, 3, 4]))
        result = {"base": base, "quote": quote, "rate": rate}
        r1 = f"The user wants the rate from {base} to {quote}. I will call get_exchange_rate with base {base} and quote {quote}."
        r2 = f"The tool says 1 {base} is {rate} {quote}."
        final = f"1 {base} is {rate} {quote}."
    else:
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        op = rng.choice(["*", "+", "-"])
        expr = f"{a} {op} {b}"
        v = eval(expr)  # noqa: S307 - two integers and an operator written just above
        q = rng.choice([f"Use the calculator to compute {expr}.", f"What is {expr}? Use the calculator tool.",
                        f"Please calculate {expr} with the calculator."])
        args = {"expression": expr}
        result = {"result": v}
        r1 = f"The user wants {expr} computed with the calculator. I will call calculator with expression {expr}."
        r2 = f"The calculator returned {v}."
        final = f"{expr} = {v}"
    return q, r1, {"name": kind, "arguments": args}, result, r2, final, kind


# ---------------------------------------------------------------- conversations

SYSTEMS = [None, None, None, "You are a helpful assistant.", "You are a careful assistant that shows its work.",
           "You are qnext-tiny, a small Qwen3-Next model. Answer briefly.",
           "You are a helpful assistant. Keep answers short.", "Be precise."]

GREETINGS = ["Hello", "Hi", "Hello, who are you?", "Who are you?", "What can you do?", "Hi there!", "Hey"]
INTRO_REASONING = "The user greets me or asks who I am. I introduce myself and say what I can do."
INTRO = ("Hello! I am qnext-tiny, a small Qwen3-Next model trained to show that qnext works. I can do "
         "arithmetic step by step, reverse, count and sort letters, convert units and call tools.")


def system_messages(rng: random.Random) -> list:
    s = rng.choice(SYSTEMS)
    return [{"role": "system", "content": s}] if s else []


def single_turn(rng: random.Random, family: str) -> Example:
    if family in ("add", "sub", "mul"):
        q, r, a, _ = arithmetic(rng, {"add": "+", "sub": "-", "mul": "*"}[family])
    elif family == "units":
        q, r, a, _ = conversion(rng)
    elif family == "reverse":
        q, r, a = reverse_task(rng)
    elif family == "count":
        q, r, a, _ = count_task(rng)
    elif family == "sort":
        q, r, a = sort_task(rng)
    elif family == "hello":
        q, r, a = rng.choice(GREETINGS), INTRO_REASONING, INTRO
    else:
        raise ValueError(family)
    msgs = system_messages(rng) + [{"role": "user", "content": q},
                                   {"role": "assistant", "content": a, "reasoning_content": r}]
    return Example(family, msgs, answer=a)


def follow_up(rng: random.Random) -> Example:
    """An arithmetic or conversion turn, then a question about its result."""
    if rng.random() < 0.3:
        q1, _, a1, v = conversion(rng)
    else:
        q1, _, a1, v = arithmetic(rng, rng.choice("+-*"))
    kind = rng.choice(["add", "mul", "sub"]) if v > 20 else rng.choice(["add", "mul"])
    if kind == "add":
        n = rng.randint(2, 999)
        q2 = rng.choice([f"Now add {n} to that.", f"And if I add {n}?", f"Add {n} to the result."])
        lines, w = add_steps(v, n)
        op = "+"
    elif kind == "sub":
        n = rng.randint(1, v - 1)
        q2 = rng.choice([f"Now subtract {n} from that.", f"And minus {n}?", f"Take {n} away from the result."])
        lines, w = sub_steps(v, n)
        op = "-"
    else:
        n = rng.randint(2, 9)
        q2 = rng.choice([f"Now multiply that by {n}.", f"And times {n}?", f"Multiply the result by {n}."])
        lines, w = mul1_steps(v, n)
        op = "*"
    reasoning = "\n".join([f"The previous result was {v}. Now I need {v} {op} {n}."] + lines + [f"So {v} {op} {n} = {w}."])
    a2 = f"{v} {op} {n} = {w}"
    msgs = system_messages(rng) + [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                   {"role": "user", "content": q2},
                                   {"role": "assistant", "content": a2, "reasoning_content": reasoning}]
    return Example("followup", msgs, answer=a2)


def tool_conversation(rng: random.Random) -> Example:
    q, r1, call, result, r2, final, kind = tool_task(rng)
    # one or two tools declared: their JSON is prompt the loss never sees, and long
    names = [kind] + rng.sample([n for n in TOOLS if n != kind], rng.randint(0, 1))
    rng.shuffle(names)
    tools = [TOOLS[n] for n in names]
    first = {"role": "assistant", "content": "", "reasoning_content": r1,
             "tool_calls": [{"type": "function", "function": call}]}
    msgs = system_messages(rng) + [{"role": "user", "content": q}, first,
                                   {"role": "tool", "content": json.dumps(result)},
                                   {"role": "assistant", "content": final, "reasoning_content": r2}]
    return Example("tool", msgs, tools=tools, answer=final, call=call, extra={"question": q})


FAMILIES = {  # family -> training weight (multiplication and follow-ups are the longest to learn)
    "add": 1.3, "sub": 1.3, "mul": 2.0, "units": 1.2, "reverse": 1.3, "count": 1.3, "sort": 1.3,
    "tool": 1.5, "followup": 1.0, "hello": 0.1,
}


def make(rng: random.Random, family: str) -> Example:
    if family == "tool":
        return tool_conversation(rng)
    if family == "followup":
        return follow_up(rng)
    return single_turn(rng, family)


def question_of(ex: Example) -> str:
    return json.dumps([m.get("content") for m in ex.messages if m["role"] == "user"])


def sample(rng: random.Random, split: str, family: str | None = None) -> Example:
    """One example of the split; `family` None draws by FAMILIES' weights."""
    fams, weights = zip(*FAMILIES.items())
    while True:
        fam = family or rng.choices(fams, weights)[0]
        ex = make(rng, fam)
        if fam == "hello" or in_split(question_of(ex), split):
            return ex
